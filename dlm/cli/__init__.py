"""The command line: argparse lives here only;
each command maps its flags to settings and calls the library."""
