from cogbatch.cli import main

main()
