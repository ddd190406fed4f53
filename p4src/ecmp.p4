/* ecmp.p4: the course's ECMP router for the fat tree (P4_16, v1model, bmv2 simple_switch).
 *
 * ipv4_lpm maps a destination prefix to one next hop (set_nhop) or to an ECMP group
 * (ecmp_group); a group's member is chosen by a crc16 hash of the 5-tuple modulo the group
 * size, looked up in ecmp_group_to_nhop. The controller (controller/routes.py) fills the
 * tables; names and parameter widths here must match what it sends
 * (tests/unit/test_p4_driver.py and tests/unit/test_src_guard.py check them).
 *
 * src_guard is BCP 38 at the edge: before routing, the source address of a packet from a
 * host port must be one the controller allows on that port (the host's own, and the VIP for
 * hosts that send from it); anything else from that port is dropped and counted in
 * src_denied[ingress port]. Switch-facing ports have no entries: the default lets them pass.
 */
#include <core.p4>
#include <v1model.p4>

const bit<16> TYPE_IPV4 = 0x0800;
const bit<8>  PROTO_TCP = 6;
const bit<8>  PROTO_UDP = 17;

typedef bit<9>  egressSpec_t;
typedef bit<48> macAddr_t;
typedef bit<32> ip4Addr_t;

const bit<32> PORT_COUNTERS = 512;  /* src_denied is indexed by the 9-bit ingress port */

header ethernet_t {
    macAddr_t dstAddr;
    macAddr_t srcAddr;
    bit<16>   etherType;
}

header ipv4_t {
    bit<4>    version;
    bit<4>    ihl;
    bit<6>    dscp;
    bit<2>    ecn;
    bit<16>   totalLen;
    bit<16>   identification;
    bit<3>    flags;
    bit<13>   fragOffset;
    bit<8>    ttl;
    bit<8>    protocol;
    bit<16>   hdrChecksum;
    ip4Addr_t srcAddr;
    ip4Addr_t dstAddr;
}

header tcp_t {
    bit<16> srcPort;
    bit<16> dstPort;
    bit<32> seqNo;
    bit<32> ackNo;
    bit<4>  dataOffset;
    bit<4>  res;
    bit<8>  flags;
    bit<16> window;
    bit<16> checksum;
    bit<16> urgentPtr;
}

header udp_t {
    bit<16> srcPort;
    bit<16> dstPort;
    bit<16> length;
    bit<16> checksum;
}

struct metadata {
    bit<14> ecmp_hash;
    bit<14> ecmp_group_id;
    bit<16> l4_src;   /* 0 when the packet is neither TCP nor UDP */
    bit<16> l4_dst;
}

struct headers {
    ethernet_t ethernet;
    ipv4_t     ipv4;
    tcp_t      tcp;
    udp_t      udp;
}

parser MyParser(packet_in packet, out headers hdr, inout metadata meta,
                inout standard_metadata_t standard_metadata) {
    state start {
        packet.extract(hdr.ethernet);
        transition select(hdr.ethernet.etherType) {
            TYPE_IPV4: parse_ipv4;
            default: accept;
        }
    }
    state parse_ipv4 {
        packet.extract(hdr.ipv4);
        /* Only the first fragment carries ports; options are not parsed (ihl 5 assumed). */
        transition select(hdr.ipv4.fragOffset, hdr.ipv4.protocol) {
            (0, PROTO_TCP): parse_tcp;
            (0, PROTO_UDP): parse_udp;
            default: accept;
        }
    }
    state parse_tcp {
        packet.extract(hdr.tcp);
        transition accept;
    }
    state parse_udp {
        packet.extract(hdr.udp);
        transition accept;
    }
}

control MyVerifyChecksum(inout headers hdr, inout metadata meta) {
    apply { }
}

control MyIngress(inout headers hdr, inout metadata meta,
                  inout standard_metadata_t standard_metadata) {

    counter(PORT_COUNTERS, CounterType.packets) src_denied;

    action drop() {
        mark_to_drop(standard_metadata);
    }

    action src_allow() {
    }

    action src_deny() {
        src_denied.count((bit<32>)standard_metadata.ingress_port);
        mark_to_drop(standard_metadata);
    }

    table src_guard {
        key = {
            standard_metadata.ingress_port: exact;
            hdr.ipv4.srcAddr: lpm;
        }
        actions = {
            src_allow;
            src_deny;
        }
        size = 1024;
        default_action = src_allow;
    }

    action set_nhop(macAddr_t dstAddr, egressSpec_t port) {
        /* The router's own MAC on the way out: the one the packet was sent to. */
        hdr.ethernet.srcAddr = hdr.ethernet.dstAddr;
        hdr.ethernet.dstAddr = dstAddr;
        standard_metadata.egress_spec = port;
        hdr.ipv4.ttl = hdr.ipv4.ttl - 1;
    }

    action ecmp_group(bit<14> ecmp_group_id, bit<16> num_nhops) {
        hash(meta.ecmp_hash,
             HashAlgorithm.crc16,
             (bit<1>)0,
             { hdr.ipv4.srcAddr,
               hdr.ipv4.dstAddr,
               meta.l4_src,
               meta.l4_dst,
               hdr.ipv4.protocol },
             num_nhops);
        meta.ecmp_group_id = ecmp_group_id;
    }

    table ecmp_group_to_nhop {
        key = {
            meta.ecmp_group_id: exact;
            meta.ecmp_hash: exact;
        }
        actions = {
            drop;
            set_nhop;
        }
        size = 1024;
        default_action = drop;
    }

    table ipv4_lpm {
        key = {
            hdr.ipv4.dstAddr: lpm;
        }
        actions = {
            set_nhop;
            ecmp_group;
            drop;
        }
        size = 1024;
        default_action = drop;
    }

    apply {
        if (hdr.ipv4.isValid()) {
            switch (src_guard.apply().action_run) {
                src_deny: {
                    /* A forged source from a host port: dropped (and counted) here. */
                    return;
                }
            }
            if (hdr.ipv4.ttl <= 1) {
                /* Expired here (no ICMP from this program): drop instead of wrapping to 255. */
                drop();
                return;
            }
            if (hdr.tcp.isValid()) {
                meta.l4_src = hdr.tcp.srcPort;
                meta.l4_dst = hdr.tcp.dstPort;
            } else if (hdr.udp.isValid()) {
                meta.l4_src = hdr.udp.srcPort;
                meta.l4_dst = hdr.udp.dstPort;
            }
            switch (ipv4_lpm.apply().action_run) {
                ecmp_group: {
                    ecmp_group_to_nhop.apply();
                }
            }
        } else {
            drop();
        }
    }
}

control MyEgress(inout headers hdr, inout metadata meta,
                 inout standard_metadata_t standard_metadata) {
    apply { }
}

control MyComputeChecksum(inout headers hdr, inout metadata meta) {
    apply {
        update_checksum(
            hdr.ipv4.isValid(),
            { hdr.ipv4.version,
              hdr.ipv4.ihl,
              hdr.ipv4.dscp,
              hdr.ipv4.ecn,
              hdr.ipv4.totalLen,
              hdr.ipv4.identification,
              hdr.ipv4.flags,
              hdr.ipv4.fragOffset,
              hdr.ipv4.ttl,
              hdr.ipv4.protocol,
              hdr.ipv4.srcAddr,
              hdr.ipv4.dstAddr },
            hdr.ipv4.hdrChecksum,
            HashAlgorithm.csum16);
    }
}

control MyDeparser(packet_out packet, in headers hdr) {
    apply {
        packet.emit(hdr.ethernet);
        packet.emit(hdr.ipv4);
        packet.emit(hdr.tcp);
        packet.emit(hdr.udp);
    }
}

V1Switch(
    MyParser(),
    MyVerifyChecksum(),
    MyIngress(),
    MyEgress(),
    MyComputeChecksum(),
    MyDeparser()
) main;
