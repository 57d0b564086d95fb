from lastseen.cli.main import main

main()
