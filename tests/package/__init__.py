"""What ships: the command line, the installed wheel, the examples, the package layout."""
