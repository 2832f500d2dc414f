from attnres_train.train.cli import main

main()
