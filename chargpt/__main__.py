from chargpt.cli import main

main()
