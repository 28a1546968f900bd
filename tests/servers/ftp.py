#!/usr/bin/env python3
"""An FTP server (pyftpdlib, from PyPI; `make deps` installs it into
target/qmp-venv) for Strata's `ftp` driver tests: one user with a
password, read-only, serving a directory on 127.0.0.1. The first line on
stdout is "PORT <n>" once it listens.

usage: ftp.py ROOT USER PASSWORD
"""
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import ThreadedFTPServer


def main():
    root, user, password = sys.argv[1:4]
    auth = DummyAuthorizer()
    auth.add_user(user, password, root, perm="elr")
    handler = FTPHandler
    handler.authorizer = auth
    srv = ThreadedFTPServer(("127.0.0.1", 0), handler)
    print(f"PORT {srv.address[1]}", flush=True)
    srv.serve_forever(handle_exit=True)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    main()
