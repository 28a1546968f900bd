#!/usr/bin/env python3
"""An implicit FTPS server (FTP inside TLS from the first byte, what
libcurl's ftps:// speaks; RFC 4217 with the TLS handshake on connect),
pyftpdlib's TLS handler made implicit, for Strata's `ftps` driver
tests. One read-only user; `make deps` installs pyftpdlib and pyOpenSSL
into target/qmp-venv. The first line on stdout is "PORT <n>".

usage: ftps.py ROOT USER PASSWORD CERT KEY
"""
import logging
import sys

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler, TLS_FTPHandler
from pyftpdlib.servers import ThreadedFTPServer


class ImplicitTLS(TLS_FTPHandler):
    # Both channels always in TLS, as implicit FTPS has them.
    tls_control_required = True
    tls_data_required = True

    def handle(self):
        # TLS first; the greeting once the handshake is done.
        self.secure_connection(self.ssl_context)

    def handle_ssl_established(self):
        FTPHandler.handle(self)

    def ftp_PROT(self, line):
        # PBSZ is implied on an implicitly secured control channel.
        self._pbsz = True
        return TLS_FTPHandler.ftp_PROT(self, line)


def main():
    root, user, password, cert, key = sys.argv[1:6]
    auth = DummyAuthorizer()
    auth.add_user(user, password, root, perm="elr")
    ImplicitTLS.authorizer = auth
    ImplicitTLS.certfile = cert
    ImplicitTLS.keyfile = key
    srv = ThreadedFTPServer(("127.0.0.1", 0), ImplicitTLS)
    print(f"PORT {srv.address[1]}", flush=True)
    srv.serve_forever(handle_exit=True)


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR)
    main()
