from twinvol.cli.main import main

main()
