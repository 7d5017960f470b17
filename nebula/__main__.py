from nebula.cli import main

main()
