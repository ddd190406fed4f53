"""PACKET_FANOUT: several AF_PACKET sockets on one interface sharing its frames, each frame to
exactly one of them (linux/if_packet.h; packet(7)).

fastpath.workers uses mode HASH: the kernel picks the socket by a flow hash of the frame
(af_packet.c fanout_demux_hash: __skb_get_hash_symmetric, computed from the frame's addresses
and TCP/UDP ports each time, never the skb's own hash, which a local sender's socket may change
on a retransmission timeout; addresses only for IP fragments, the first one included), scaled to
the number of sockets in the group, so every frame of a flow reaches the same worker while the
group does not change. Flags chosen, and why:
- no PACKET_FANOUT_FLAG_DEFRAG: it would reassemble IP fragments before the tap, and the LB
  forwards fragments one by one (fastpath.balancer: all of a datagram's fragments hash by
  their addresses, as the kernel's flow hash does, so they already share a worker);
- no PACKET_FANOUT_FLAG_ROLLOVER: a full ring would move a flow to another worker;
- PACKET_FANOUT_FLAG_UNIQUEID on the first socket: the kernel picks a group id no other group
  in the namespace uses (two LBs, or any other fanout user, can never join each other's
  group); the others join that id, read back with getsockopt.
"""

from __future__ import annotations

import socket
import struct

from l4lb.ring import SOL_PACKET

PACKET_FANOUT = 18
PACKET_FANOUT_HASH = 0
PACKET_FANOUT_FLAG_UNIQUEID = 0x2000
_INT = struct.Struct("=I")


def fanout_arg(group: int, mode: int = PACKET_FANOUT_HASH, flags: int = 0) -> int:
    """The PACKET_FANOUT option value: group id in the low 16 bits, mode | flags above."""
    if not 0 <= group <= 0xFFFF:
        raise ValueError(f"fanout group id {group}: must be 0..65535")
    return group | ((mode | flags) << 16)


def create_group(sock: socket.socket, mode: int = PACKET_FANOUT_HASH) -> int:
    """Make a new group with a kernel-chosen unique id with bound `sock` in it; returns the id."""
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, fanout_arg(0, mode, PACKET_FANOUT_FLAG_UNIQUEID))
    return group_id(sock)


def join_group(sock: socket.socket, group: int, mode: int = PACKET_FANOUT_HASH) -> None:
    """Put bound `sock` in the existing group `group` (same interface, mode and flags)."""
    sock.setsockopt(SOL_PACKET, PACKET_FANOUT, fanout_arg(group, mode))


def group_id(sock: socket.socket) -> int:
    """The id of the group `sock` is in."""
    (value,) = _INT.unpack(sock.getsockopt(SOL_PACKET, PACKET_FANOUT, _INT.size))
    return int(value & 0xFFFF)
