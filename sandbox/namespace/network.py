"""Network: a fresh network namespace has a loopback interface that is down.

Bring it up so a task can talk to itself on 127.0.0.1 (test servers, build
daemons); nothing else exists in the namespace, so nothing outside is
reachable. Runs while the sandbox still holds CAP_NET_ADMIN over the
namespace, before the task's own user namespace is entered.
"""

from __future__ import annotations

import fcntl
import socket
import struct

_SIOCGIFFLAGS = 0x8913
_SIOCSIFFLAGS = 0x8914
_IFF_UP = 0x1
_IFREQ = "16sH22x"  # struct ifreq: ifr_name[IFNAMSIZ], ifr_flags, padding


def loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        req = struct.pack(_IFREQ, b"lo", 0)
        flags = struct.unpack(_IFREQ, fcntl.ioctl(sock.fileno(), _SIOCGIFFLAGS, req))[1]
        fcntl.ioctl(sock.fileno(), _SIOCSIFFLAGS, struct.pack(_IFREQ, b"lo", flags | _IFF_UP))
