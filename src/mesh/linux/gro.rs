//! Coalescing TCP segments on their way into the kernel: what GRO does for a network card. A
//! run of consecutive segments of one TCP/IPv4 flow, in sequence, becomes one packet of up to
//! 64 KiB, which the TUN device takes in one write with a virtio-net header saying how it
//! divides (TCP segmentation offload backwards). The kernel's TCP then does its per-packet
//! work (and its acknowledgements) once per run instead of once per segment.
//!
//! Nothing is copied: the first segment's headers are rewritten in place and the others'
//! payloads follow it in the same `writev`. The rules are the kernel's own (`tcp_gro_receive`):
//! same addresses, ports, acknowledgement, window, header options, TTL, TOS and DF; IP IDs
//! counting up by one (or, with DF, all the same); flags ACK (PSH only on the last); sequence
//! numbers contiguous; every segment but the last of the first one's size. A segment whose IP
//! or TCP checksum is wrong is never merged (it goes alone, for the kernel to drop), since a
//! merged packet's checksums are the kernel's to trust.

use std::ops::Range;
use tun_rs::{VirtioNetHdr, VIRTIO_NET_HDR_GSO_TCPV4};

/// Segments in one coalesced packet at most (the kernel's GRO stops at 64 as well).
pub const MAX_SEGMENTS: usize = 64;
/// An IPv4 packet's largest total length.
const MAX_IP_LEN: usize = 65535;
const IP_HDR: usize = 20;
const TCP_ACK: u8 = 0x10;
const TCP_PSH: u8 = 0x08;
/// virtio-net: `csum_start` and `csum_offset` say where the checksum goes.
const NEEDS_CSUM: u8 = 1;

/// A TCP/IPv4 segment's headers, as far as coalescing looks at them.
#[derive(Clone, Copy, Debug)]
struct Seg {
    /// IP and TCP header bytes.
    hdr: usize,
    seq: u32,
    payload: usize,
    psh: bool,
}

/// The segment `p` is, if it is one coalescing can take: IPv4 without options or fragments,
/// TCP with ACK (and maybe PSH) only, carrying data, its length as the header says.
fn segment(p: &[u8]) -> Option<Seg> {
    if p.len() < IP_HDR + 20 || p[0] != 0x45 || p[9] != 6 {
        return None;
    }
    if usize::from(u16::from_be_bytes([p[2], p[3]])) != p.len() {
        return None;
    }
    // The reserved bit, more fragments, or a fragment offset.
    if p[6] & 0xbf != 0 || p[7] != 0 {
        return None;
    }
    let thl = usize::from(p[IP_HDR + 12] >> 4) * 4;
    if thl < 20 || IP_HDR + thl > p.len() {
        return None;
    }
    let flags = p[IP_HDR + 13];
    if flags != TCP_ACK && flags != TCP_ACK | TCP_PSH {
        return None;
    }
    let hdr = IP_HDR + thl;
    let payload = p.len() - hdr;
    if payload == 0 {
        return None;
    }
    let seq = u32::from_be_bytes(p[IP_HDR + 4..IP_HDR + 8].try_into().ok()?);
    Some(Seg {
        hdr,
        seq,
        payload,
        psh: flags & TCP_PSH != 0,
    })
}

/// Whether segment `q`, the `k`th after the head, may join the packet headed by `head`: the
/// same flow and headers (everything but the IP length and checksum, the sequence number,
/// PSH and the TCP checksum; IP IDs counting up, or fixed with DF), which the caller checks
/// before the checksums.
fn same_flow(head: &[u8], h: &Seg, q: &[u8], s: &Seg, k: usize) -> bool {
    let id = |p: &[u8]| u16::from_be_bytes([p[4], p[5]]);
    let df = head[6] & 0x40 != 0;
    s.hdr == h.hdr
        // TOS, DF, TTL.
        && head[1] == q[1]
        && head[6] == q[6]
        && head[8] == q[8]
        // IDs one up per segment; with DF also all the same (what the kernel's GRO takes).
        && (id(q) == id(head).wrapping_add(k as u16) || (df && id(q) == id(head)))
        // Addresses and ports.
        && head[12..IP_HDR + 4] == q[12..IP_HDR + 4]
        // Acknowledgement.
        && head[IP_HDR + 8..IP_HDR + 12] == q[IP_HDR + 8..IP_HDR + 12]
        // Data offset and reserved bits (the flags are ACK, PSH aside), window.
        && head[IP_HDR + 12] == q[IP_HDR + 12]
        && head[IP_HDR + 14..IP_HDR + 16] == q[IP_HDR + 14..IP_HDR + 16]
        // Options (timestamps).
        && head[IP_HDR + 20..h.hdr] == q[IP_HDR + 20..s.hdr]
}

/// The ones' complement sum of the pseudo header and the TCP segment of IPv4 packet `p`,
/// folded: 0xffff when its checksum is right.
fn tcp_sum(p: &[u8], tcp_len: usize, data: &[u8]) -> u16 {
    let pseudo = tun_rs::checksum_no_fold(&p[12..20], 0);
    let len = (tcp_len as u16).to_be_bytes();
    let pseudo = tun_rs::checksum_no_fold(&[0, 6, len[0], len[1]], pseudo);
    tun_rs::checksum(data, pseudo)
}

/// Whether the IP header's and the TCP segment's checksums are right.
fn checksum_ok(p: &[u8]) -> bool {
    tun_rs::checksum(&p[..IP_HDR], 0) == 0xffff
        && tcp_sum(p, p.len() - IP_HDR, &p[IP_HDR..]) == 0xffff
}

/// One planned write: the packets `range`. A group of one is a packet as it is; a longer one
/// is a run of TCP segments, written as one packet (see [`finish`]), with what planning
/// learned of them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Group {
    pub range: Range<usize>,
    /// IP and TCP header bytes of every segment (the payloads start there).
    pub hdr: usize,
    /// The first segment's payload: the size the kernel divides the packet into.
    gso_size: usize,
    /// Payload bytes of all the segments.
    payload: usize,
    /// Whether the last segment has PSH.
    psh: bool,
}

/// Split the packets `bufs[i][offset..]` into groups of consecutive indexes, in order, each
/// written as one packet.
pub fn plan(bufs: &[Vec<u8>], offset: usize, groups: &mut Vec<Group>) {
    groups.clear();
    let n = bufs.len();
    let mut i = 0;
    while i < n {
        let head = &bufs[i][offset..];
        let mut end = i + 1;
        let mut group = Group::default();
        if let Some(h) = segment(head) {
            let mut next_seq = h.seq.wrapping_add(h.payload as u32);
            let mut len = head.len();
            let mut last = h;
            // The head's checksum is looked at once a segment could follow it.
            let mut head_ok = None;
            while end < n && end - i < MAX_SEGMENTS && !last.psh && last.payload == h.payload {
                let q = &bufs[end][offset..];
                let Some(s) = segment(q) else { break };
                if s.seq != next_seq
                    || s.payload > h.payload
                    || len + s.payload > MAX_IP_LEN
                    || !same_flow(head, &h, q, &s, end - i)
                {
                    break;
                }
                if !*head_ok.get_or_insert_with(|| checksum_ok(head)) || !checksum_ok(q) {
                    break;
                }
                next_seq = next_seq.wrapping_add(s.payload as u32);
                len += s.payload;
                last = s;
                end += 1;
            }
            group = Group {
                range: 0..0,
                hdr: h.hdr,
                gso_size: h.payload,
                payload: len - h.hdr,
                psh: last.psh,
            };
        }
        group.range = i..end;
        groups.push(group);
        i = end;
    }
}

/// Make the head of planned group `g` (its first packet, in `buf` at `offset`) the header of
/// the coalesced packet: IP total length and header checksum, PSH, the pseudo header's sum in
/// the TCP checksum for the kernel to finish, and the virtio-net header in the
/// `VIRTIO_NET_HDR_LEN` bytes before it. The payloads of the other segments (each from
/// `g.hdr`) follow the head's own in the write.
pub fn finish(buf: &mut [u8], offset: usize, g: &Group) {
    let total = g.hdr + g.payload;
    let p = &mut buf[offset..];
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    p[10..12].fill(0);
    let ip_sum = !tun_rs::checksum(&p[..IP_HDR], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    if g.psh {
        p[IP_HDR + 13] |= TCP_PSH;
    }
    let pseudo = tcp_sum(p, total - IP_HDR, &[]);
    p[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&pseudo.to_be_bytes());
    let vnet = VirtioNetHdr {
        flags: NEEDS_CSUM,
        gso_type: VIRTIO_NET_HDR_GSO_TCPV4,
        hdr_len: g.hdr as u16,
        gso_size: g.gso_size as u16,
        csum_start: IP_HDR as u16,
        csum_offset: 16,
    };
    vnet.encode(&mut buf[offset - tun_rs::VIRTIO_NET_HDR_LEN..offset])
        .expect("room for the virtio-net header");
}

/// A TCP/IPv4 packet `from` -> `to` (address and port) behind `headroom` bytes of garbage,
/// with TCP `options` (a multiple of 4 bytes) and its checksums right: for the tests here and
/// the TUN device's.
#[cfg(test)]
#[allow(clippy::too_many_arguments)]
pub(crate) fn tcp4(
    headroom: usize,
    from: ([u8; 4], u16),
    to: ([u8; 4], u16),
    seq: u32,
    ack: u32,
    flags: u8,
    options: &[u8],
    data: &[u8],
) -> Vec<u8> {
    let thl = 20 + options.len();
    let total = IP_HDR + thl + data.len();
    let mut b = vec![0xa5u8; headroom];
    b.resize(headroom + total, 0);
    let p = &mut b[headroom..];
    p[0] = 0x45;
    p[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    // DF and ID 0 in every packet (a fixed ID, which GRO takes with DF; the tests set IDs
    // where they matter).
    p[6] = 0x40;
    p[8] = 64;
    p[9] = 6;
    p[12..16].copy_from_slice(&from.0);
    p[16..20].copy_from_slice(&to.0);
    let ip_sum = !tun_rs::checksum(&p[..IP_HDR], 0);
    p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
    let t = &mut p[IP_HDR..];
    t[0..2].copy_from_slice(&from.1.to_be_bytes());
    t[2..4].copy_from_slice(&to.1.to_be_bytes());
    t[4..8].copy_from_slice(&seq.to_be_bytes());
    t[8..12].copy_from_slice(&ack.to_be_bytes());
    t[12] = ((thl / 4) as u8) << 4;
    t[13] = flags;
    t[14..16].copy_from_slice(&65535u16.to_be_bytes());
    t[20..thl].copy_from_slice(options);
    t[thl..].copy_from_slice(data);
    let sum = !tcp_sum(p, total - IP_HDR, &p[IP_HDR..]);
    p[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&sum.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    const OFF: usize = 16;

    /// A segment 10.0.0.1:4000 -> 10.0.0.2:5000 with timestamps, behind OFF bytes.
    fn seg(seq: u32, data: &[u8], psh: bool, ack: u32) -> Vec<u8> {
        let flags = if psh { TCP_ACK | TCP_PSH } else { TCP_ACK };
        // NOP NOP timestamps.
        let ts = [1, 1, 8, 10, 0, 0, 0, 7, 0, 0, 0, 9];
        let (a, b) = (([10, 0, 0, 1], 4000), ([10, 0, 0, 2], 5000));
        tcp4(OFF, a, b, seq, ack, flags, &ts, data)
    }

    /// Change the packet in `b` (after OFF) with `f`, then make both checksums right again.
    fn edit(b: &mut [u8], f: impl FnOnce(&mut [u8])) {
        let p = &mut b[OFF..];
        f(p);
        p[10..12].fill(0);
        let ip_sum = !tun_rs::checksum(&p[..IP_HDR], 0);
        p[10..12].copy_from_slice(&ip_sum.to_be_bytes());
        p[IP_HDR + 16..IP_HDR + 18].fill(0);
        let len = p.len() - IP_HDR;
        let sum = !tcp_sum(p, len, &p[IP_HDR..]);
        p[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&sum.to_be_bytes());
    }

    fn flow(n: usize, size: usize) -> Vec<Vec<u8>> {
        (0..n)
            .map(|i| seg(1000 + (i * size) as u32, &vec![i as u8; size], false, 1))
            .collect()
    }

    fn planned(bufs: &[Vec<u8>]) -> Vec<Range<usize>> {
        let mut g = Vec::new();
        plan(bufs, OFF, &mut g);
        g.into_iter().map(|g| g.range).collect()
    }

    #[test]
    fn a_flow_in_order_is_one_packet_up_to_the_limits() {
        assert_eq!(planned(&flow(10, 1368)), vec![0..10]);
        // 64 KiB: 47 segments of 1,368 bytes and their headers fit, the 48th does not.
        assert_eq!(planned(&flow(50, 1368)), vec![0..47, 47..50]);
        assert_eq!(planned(&flow(130, 100)), vec![0..64, 64..128, 128..130]);
        assert_eq!(planned(&flow(1, 1368)), vec![0..1]);
        assert_eq!(planned(&[]), Vec::<Range<usize>>::new());
    }

    #[test]
    fn what_the_kernel_would_not_merge_stays_apart() {
        let mut b = flow(6, 1000);
        // A gap in the sequence before 2.
        b[2] = seg(1000 + 2000 + 1, &[2; 1000], false, 1);
        assert_eq!(planned(&b), vec![0..2, 2..3, 3..6]);
        // Another acknowledgement number.
        let mut b = flow(4, 1000);
        b[2] = seg(3000, &[2; 1000], false, 2);
        assert_eq!(planned(&b), vec![0..2, 2..3, 3..4]);
        // PSH ends a packet; a short segment ends it too.
        let mut b = flow(4, 1000);
        b[1] = seg(2000, &[1; 1000], true, 1);
        assert_eq!(planned(&b), vec![0..2, 2..4]);
        let mut b = flow(4, 1000);
        b[1] = seg(2000, &[1; 500], false, 1);
        b[2] = seg(2500, &[2; 1000], false, 1);
        b[3] = seg(3500, &[3; 1000], false, 1);
        assert_eq!(planned(&b), vec![0..2, 2..4]);
        // A bigger segment after the first cannot follow.
        let mut b = flow(2, 500);
        b[1] = seg(1500, &[1; 1000], false, 1);
        assert_eq!(planned(&b), vec![0..1, 1..2]);
        // Another TTL, TOS, window, timestamp or port (checksums made right again): apart.
        for (at, what) in [
            (8, "TTL"),
            (1, "TOS"),
            (IP_HDR + 15, "window"),
            (IP_HDR + 27, "timestamp"),
            (IP_HDR + 1, "source port"),
        ] {
            let mut b = flow(3, 1000);
            edit(&mut b[1], |p| p[at] ^= 1);
            assert_eq!(planned(&b), vec![0..1, 1..2, 2..3], "{what}");
        }
        // Not TCP data: a pure ACK.
        let b = vec![seg(1000, &[], false, 1), seg(1000, &[], false, 1)];
        assert_eq!(planned(&b), vec![0..1, 1..2]);
        // Fragments and the reserved bit are never taken.
        for bits in [0x20, 0x80] {
            let mut b = flow(2, 1000);
            edit(&mut b[1], |p| p[6] |= bits);
            assert_eq!(planned(&b), vec![0..1, 1..2], "flags {bits:#x}");
        }
        // IP IDs: counting up merges, with or without DF; a fixed ID only with DF; any other
        // step never.
        let ids = |df: bool, step: u16| {
            let mut b = flow(3, 1000);
            for (k, p) in b.iter_mut().enumerate() {
                edit(p, |p| {
                    p[6] = if df { 0x40 } else { 0 };
                    p[4..6].copy_from_slice(&(7 + step * k as u16).to_be_bytes());
                });
            }
            planned(&b)
        };
        assert_eq!(ids(false, 1), vec![0..3]);
        assert_eq!(ids(true, 1), vec![0..3]);
        assert_eq!(ids(true, 0), vec![0..3]);
        assert_eq!(ids(false, 0), vec![0..1, 1..2, 2..3]);
        assert_eq!(ids(true, 1000), vec![0..1, 1..2, 2..3]);
        // A wrong checksum, TCP or IP: never merged, on either side.
        let mut b = flow(4, 1000);
        b[2][OFF + IP_HDR + 40] ^= 0xff;
        assert_eq!(planned(&b), vec![0..2, 2..3, 3..4]);
        let mut b = flow(3, 1000);
        b[0][OFF + IP_HDR + 40] ^= 0xff;
        assert_eq!(planned(&b), vec![0..1, 1..3]);
        let mut b = flow(3, 1000);
        b[1][OFF + 10] ^= 0xff;
        assert_eq!(planned(&b), vec![0..1, 1..2, 2..3]);
    }

    #[test]
    fn sequence_numbers_wrap_around_within_a_packet() {
        let b: Vec<Vec<u8>> = (0..3u32)
            .map(|k| {
                seg(
                    (u32::MAX - 1500).wrapping_add(k * 1000),
                    &[k as u8; 1000],
                    false,
                    1,
                )
            })
            .collect();
        assert_eq!(planned(&b), vec![0..3]);
    }

    /// The coalesced packet is what the kernel's segmentation would split back into the
    /// segments: headers as the head's with the total length, a right IP checksum, PSH from
    /// the last, the pseudo header's sum for the kernel to finish, and a virtio-net header
    /// that says how to divide it.
    #[test]
    fn a_finished_head_describes_the_whole_packet() {
        let mut b = flow(3, 1000);
        b[2] = seg(3000, &[2; 600], true, 1);
        let mut groups = Vec::new();
        plan(&b, OFF, &mut groups);
        let [g] = &groups[..] else {
            panic!("one group: {groups:?}")
        };
        assert_eq!(g.range, 0..3);
        assert_eq!(
            (g.hdr, g.gso_size, g.payload, g.psh),
            (52, 1000, 2600, true)
        );
        let mut head = b[0].clone();
        finish(&mut head, OFF, g);
        let p = &head[OFF..];
        let total = IP_HDR + 32 + 2600;
        assert_eq!(usize::from(u16::from_be_bytes([p[2], p[3]])), total);
        assert_eq!(
            tun_rs::checksum(&p[..IP_HDR], 0),
            0xffff,
            "IP header checksum"
        );
        assert_eq!(p[IP_HDR + 13], TCP_ACK | TCP_PSH);
        // The whole packet's TCP checksum, finished as the kernel does (the sum over the TCP
        // header with the pseudo header's sum in place, and every payload), comes out right.
        let mut whole = p.to_vec();
        whole.extend(&b[1][OFF + g.hdr..]);
        whole.extend(&b[2][OFF + g.hdr..]);
        let partial = tun_rs::checksum(&whole[IP_HDR..], 0);
        whole[IP_HDR + 16..IP_HDR + 18].copy_from_slice(&(!partial).to_be_bytes());
        assert!(checksum_ok(&whole), "the finished checksum verifies");
        let v = &head[OFF - tun_rs::VIRTIO_NET_HDR_LEN..OFF];
        let u = |i: usize| u16::from_ne_bytes([v[i], v[i + 1]]);
        assert_eq!((v[0], v[1]), (NEEDS_CSUM, VIRTIO_NET_HDR_GSO_TCPV4));
        assert_eq!((u(2), u(4), u(6), u(8)), (52, 1000, 20, 16));
    }
}
