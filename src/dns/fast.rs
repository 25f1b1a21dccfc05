//! The UDP side of mesh DNS: answers for the mesh zone are prepared when the zone changes, by
//! asking hickory's own catalog every question the zone can answer and keeping its encoded
//! response; a query then costs a header check, one map lookup and a copy (its ID, flags and
//! question, case kept, written over the prepared bytes). Everything else (names not in the
//! zone, other types, forwarded names, DNSSEC, EDNS options, anything odd) goes to hickory
//! as before, from the same socket. TCP is hickory's server unchanged.

use hickory_server::net::runtime::TokioTime;
use hickory_server::net::xfer::Protocol;
use hickory_server::net::NetError;
use hickory_server::proto::op::{
    Edns, Header, HeaderCounts, Message, MessageType, Metadata, OpCode, Query, ResponseCode,
};
use hickory_server::proto::rr::{Name, Record, RecordType};
use hickory_server::proto::serialize::binary::{BinEncodable, BinEncoder};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponse;
use std::collections::{BTreeSet, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, RwLock};
use tokio::net::UdpSocket;
use tokio::sync::Semaphore;
use tracing::debug;

/// Queries hickory handles at once from one socket (forwarded ones wait for upstreams); more
/// are dropped, and clients retry.
const SLOW_IN_FLIGHT: usize = 256;
const PLAIN_MAX: usize = 512;
/// The EDNS payload the prepared EDNS answers are asked with (and sized against).
const PREPARED_PAYLOAD: u16 = 1232;

/// One prepared answer: hickory's response to the question, without and with EDNS.
struct Answer {
    plain: Option<Box<[u8]>>,
    /// With the offset of the OPT record's payload field, patched to the client's.
    edns: Option<(Box<[u8]>, usize)>,
}

/// Prepared answers by lower-case wire name followed by the type.
#[derive(Default)]
pub struct Prepared(HashMap<Box<[u8]>, Answer>);

impl Prepared {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// The current prepared answers, swapped whole; cleared at once when the zone changes and
/// filled when the new answers are ready (a generation keeps a late build from an older zone
/// out).
#[derive(Default)]
pub struct Answers {
    current: RwLock<Arc<Prepared>>,
    generation: Mutex<u64>,
    /// Queries answered from the prepared answers.
    hits: std::sync::atomic::AtomicU64,
}

impl Answers {
    /// Forget the prepared answers (the zone changed); the generation to [`Self::install`] at.
    pub fn invalidate(&self) -> u64 {
        let mut g = self.generation.lock().unwrap();
        *g += 1;
        *self.current.write().unwrap() = Arc::default();
        *g
    }

    /// Install answers built for generation `g`, unless the zone changed again since.
    pub fn install(&self, g: u64, p: Prepared) -> bool {
        let current = self.generation.lock().unwrap();
        if *current != g {
            return false;
        }
        *self.current.write().unwrap() = Arc::new(p);
        true
    }

    pub fn get(&self) -> Arc<Prepared> {
        self.current.read().unwrap().clone()
    }

    pub fn hits(&self) -> u64 {
        self.hits.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Whether generation `g` is still the zone's (a build for an older one can stop).
    pub fn is_current(&self, g: u64) -> bool {
        *self.generation.lock().unwrap() == g
    }
}

/// Ask `handler` every (name, type) the records hold, with and without EDNS, and keep the
/// answers that fit a plain UDP response (or the prepared EDNS size). Stops early (`None`)
/// once `current` says the zone changed again, so a burst of membership changes costs one
/// build, not one per change.
pub fn prepare<H: RequestHandler>(
    handler: &H,
    records: &[&Record],
    current: impl Fn() -> bool,
) -> Option<Prepared> {
    let questions: BTreeSet<(Name, RecordType)> = records
        .iter()
        .map(|r| (r.name.to_lowercase(), r.record_type()))
        .collect();
    let mut out = HashMap::new();
    for (i, (name, rtype)) in questions.into_iter().enumerate() {
        if i % 64 == 0 && !current() {
            return None;
        }
        let plain = ask(handler, &name, rtype, false).filter(|b| b.len() <= PLAIN_MAX);
        let edns = ask(handler, &name, rtype, true).and_then(|b| {
            let at = opt_payload_offset(&b)?;
            (b.len() <= PREPARED_PAYLOAD as usize).then_some((b, at))
        });
        if plain.is_none() && edns.is_none() {
            continue;
        }
        let mut key = name.to_bytes().unwrap_or_default();
        key.extend_from_slice(&u16::from(rtype).to_be_bytes());
        out.insert(
            key.into_boxed_slice(),
            Answer {
                plain: plain.map(Vec::into_boxed_slice),
                edns: edns.map(|(b, at)| (b.into_boxed_slice(), at)),
            },
        );
    }
    Some(Prepared(out))
}

/// hickory's encoded answer to one question (zone lookups only: no I/O, so it runs to
/// completion here).
fn ask<H: RequestHandler>(h: &H, name: &Name, rtype: RecordType, edns: bool) -> Option<Vec<u8>> {
    let mut m = Message::query();
    m.metadata.recursion_desired = true;
    m.add_query(Query::query(name.clone(), rtype));
    if edns {
        let mut e = Edns::new();
        e.set_max_payload(PREPARED_PAYLOAD);
        m.set_edns(e);
    }
    let bytes = m.to_vec().ok()?;
    let req = Request::from_bytes(bytes, ([127, 0, 0, 1], 0).into(), Protocol::Udp).ok()?;
    let store = Arc::new(Mutex::new(None));
    let reply = Reply {
        sink: Sink::Capture(store.clone()),
        id: req.metadata.id,
        max: if edns {
            PREPARED_PAYLOAD
        } else {
            PLAIN_MAX as u16
        },
    };
    let info = futures::executor::block_on(h.handle_request::<_, TokioTime>(&req, reply));
    if info.response_code != ResponseCode::NoError {
        return None;
    }
    // Not truncated: a prepared answer is whole.
    let b = store.lock().unwrap().take();
    b.filter(|b| b.len() >= 12 && b[2] & 0x02 == 0)
}

/// The offset of the payload (class) field of a trailing option-less OPT record.
fn opt_payload_offset(b: &[u8]) -> Option<usize> {
    let n = b.len().checked_sub(11)?;
    let opt = &b[n..];
    (opt[0] == 0 && opt[1..3] == [0, 41] && opt[9..11] == [0, 0] && b[10..12] != [0, 0])
        .then_some(n + 3)
}

/// What a query asks, when it is one the prepared answers can take: its key (written into
/// `key`), where its question ends, and the client's EDNS payload if it sent a plain OPT.
struct Simple {
    question_end: usize,
    edns: Option<u16>,
}

/// A standard query with one question of class IN, no compression, and either nothing else
/// or one option-less EDNS(0) OPT without DO; anything else is for hickory.
fn simple(q: &[u8], key: &mut Vec<u8>) -> Option<Simple> {
    if q.len() < 12 || q[2] & 0xf8 != 0 || q[4..10] != [0, 1, 0, 0, 0, 0] || q[10] != 0 {
        return None; // a response, another opcode, truncated, or not exactly one question
    }
    let arcount = q[11];
    key.clear();
    let mut i = 12;
    loop {
        let l = *q.get(i)? as usize;
        if l == 0 {
            key.push(0);
            i += 1;
            break;
        }
        if l > 63 || key.len() + l + 1 > 255 {
            return None; // a pointer or an oversized name
        }
        key.push(l as u8);
        key.extend(q.get(i + 1..i + 1 + l)?.iter().map(u8::to_ascii_lowercase));
        i += 1 + l;
    }
    let tail = q.get(i..i + 4)?;
    if tail[2..4] != [0, 1] {
        return None;
    }
    key.extend_from_slice(&tail[0..2]);
    let question_end = i + 4;
    let edns = match arcount {
        0 if q.len() == question_end => None,
        1 => {
            // root name, type OPT, payload, extended rcode 0, version 0, flags 0, no options
            let o = q.get(question_end..)?;
            if o.len() != 11 || o[0] != 0 || o[1..3] != [0, 41] || o[5..11] != [0; 6] {
                return None;
            }
            Some(u16::from_be_bytes([o[3], o[4]]))
        }
        _ => return None,
    };
    Some(Simple { question_end, edns })
}

/// The prepared response to `q`, written into `out`; false if there is none.
fn answer(p: &Prepared, q: &[u8], key: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
    let Some(s) = simple(q, key) else {
        return false;
    };
    let Some(a) = p.0.get(key.as_slice()) else {
        return false;
    };
    let (bytes, payload_at) = match (s.edns, &a.plain, &a.edns) {
        (None, Some(b), _) => (b, None),
        (Some(size), _, Some((b, at))) if b.len() <= usize::from(size.max(512)) => (b, Some(*at)),
        _ => return false,
    };
    out.clear();
    out.extend_from_slice(bytes);
    out[0..2].copy_from_slice(&q[0..2]);
    // RD and CD as the client set them; the question as it was asked (0x20 case kept).
    out[2] = (out[2] & !0x01) | (q[2] & 0x01);
    out[3] = (out[3] & !0x10) | (q[3] & 0x10);
    out[12..s.question_end].copy_from_slice(&q[12..s.question_end]);
    if let (Some(at), Some(size)) = (payload_at, s.edns) {
        out[at..at + 2].copy_from_slice(&size.max(512).to_be_bytes());
    }
    true
}

/// Serve UDP queries on `sock`: prepared answers inline, a batch of queries per receive and
/// their answers per send (`recvmmsg`/`sendmmsg`), the rest through `handler`.
pub async fn serve<H: RequestHandler + Clone>(sock: UdpSocket, handler: H, answers: Arc<Answers>) {
    use crate::mesh::linux::mmsg;
    use std::os::fd::AsRawFd;
    use tokio::io::Interest;
    let sock = Arc::new(sock);
    let fd = sock.as_raw_fd();
    let slow = Arc::new(Semaphore::new(SLOW_IN_FLIGHT));
    let mut bufs = vec![vec![0u8; 4096]; mmsg::BATCH];
    let mut got = Vec::with_capacity(mmsg::BATCH);
    let mut outs: Vec<Vec<u8>> = (0..mmsg::BATCH)
        .map(|_| Vec::with_capacity(PREPARED_PAYLOAD as usize))
        .collect();
    let mut dst: Vec<SocketAddr> = Vec::with_capacity(mmsg::BATCH);
    let mut key = Vec::with_capacity(260);
    loop {
        match sock
            .async_io(Interest::READABLE, || mmsg::recv(fd, &mut bufs, &mut got))
            .await
        {
            Ok(_) => {}
            Err(e) => {
                // ICMP errors from earlier answers surface here; anything else is logged and
                // retried, not a busy loop.
                use std::io::ErrorKind::*;
                if !matches!(e.kind(), ConnectionRefused | ConnectionReset | Interrupted) {
                    tracing::warn!(error = %e, "mesh DNS: receiving failed");
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                }
                continue;
            }
        }
        let prepared = answers.get();
        dst.clear();
        for (i, r) in got.iter().enumerate() {
            let q = &bufs[i][..r.len];
            if r.from.port() == 0 || r.truncated {
                continue;
            }
            if answer(&prepared, q, &mut key, &mut outs[dst.len()]) {
                crate::metrics::dns_answer(u16::from(outs[dst.len()][3] & 0x0f));
                dst.push(r.from);
                continue;
            }
            let Ok(permit) = slow.clone().try_acquire_owned() else {
                continue;
            };
            let (sock, handler, q, src) = (sock.clone(), handler.clone(), q.to_vec(), r.from);
            tokio::spawn(async move {
                slow_path(&sock, &handler, q, src).await;
                drop(permit);
            });
        }
        if dst.is_empty() {
            continue;
        }
        answers
            .hits
            .fetch_add(dst.len() as u64, std::sync::atomic::Ordering::Relaxed);
        let msgs: Vec<(&[u8], SocketAddr)> =
            outs.iter().zip(&dst).map(|(b, a)| (&b[..], *a)).collect();
        let mut sent = 0;
        // Bounded: each round sends at least one, or waits for room.
        while sent < msgs.len() {
            match sock
                .async_io(Interest::WRITABLE, || mmsg::send(fd, &msgs[sent..]))
                .await
            {
                Ok(n) => sent += n.max(1),
                Err(e) => {
                    debug!(error = %e, "DNS send");
                    sent += 1; // that answer is lost; the client retries
                }
            }
        }
    }
}

async fn slow_path<H: RequestHandler>(sock: &Arc<UdpSocket>, h: &H, q: Vec<u8>, src: SocketAddr) {
    if q.len() < 12 || q[2] & 0x80 != 0 {
        return; // not even a header, or a response (no reflection)
    }
    let id = u16::from_be_bytes([q[0], q[1]]);
    let req = match Request::from_bytes(q.clone(), src, Protocol::Udp) {
        Ok(r) => r,
        Err(_) => {
            // The header is there: say FORMERR, as hickory's server does.
            let mut b = Vec::with_capacity(12);
            let mut metadata = Metadata::new(id, MessageType::Response, OpCode::Query);
            metadata.response_code = ResponseCode::FormErr;
            let header = Header {
                metadata,
                counts: HeaderCounts::default(),
            };
            if header.emit(&mut BinEncoder::new(&mut b)).is_ok() {
                crate::metrics::dns_answer(u16::from(ResponseCode::FormErr));
                let _ = sock.send_to(&b, src).await;
            }
            return;
        }
    };
    let max = req
        .edns
        .as_ref()
        .map_or(PLAIN_MAX as u16, |e| e.max_payload().max(512));
    let reply = Reply {
        sink: Sink::Udp(sock.clone(), src),
        id,
        max,
    };
    h.handle_request::<_, TokioTime>(&req, reply).await;
}

#[derive(Clone)]
enum Sink {
    Udp(Arc<UdpSocket>, SocketAddr),
    Capture(Arc<Mutex<Option<Vec<u8>>>>),
}

/// hickory's response, encoded at most `max` bytes (truncated by hickory past that), sent or
/// kept.
#[derive(Clone)]
struct Reply {
    sink: Sink,
    id: u16,
    max: u16,
}

#[async_trait::async_trait]
impl ResponseHandler for Reply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
            impl Iterator<Item = &'a Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        let mut bytes = Vec::with_capacity(512);
        let mut enc = BinEncoder::new(&mut bytes);
        enc.set_max_size(self.max);
        let info = match response.destructive_emit(&mut enc) {
            Ok(info) => info,
            Err(e) => {
                debug!(error = %e, "encoding a DNS response");
                bytes.clear();
                let mut metadata = Metadata::new(self.id, MessageType::Response, OpCode::Query);
                metadata.response_code = ResponseCode::ServFail;
                let header = Header {
                    metadata,
                    counts: HeaderCounts::default(),
                };
                header.emit(&mut BinEncoder::new(&mut bytes))?;
                ResponseInfo::from(header)
            }
        };
        match &self.sink {
            Sink::Udp(sock, dst) => {
                sock.send_to(&bytes, dst).await?;
            }
            Sink::Capture(store) => *store.lock().unwrap() = Some(bytes),
        }
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(name: &str, rtype: RecordType, edns: Option<u16>, id: u16) -> Vec<u8> {
        let mut m = Message::query();
        m.metadata.id = id;
        m.metadata.recursion_desired = true;
        m.add_query(Query::query(Name::from_ascii(name).unwrap(), rtype));
        if let Some(p) = edns {
            let mut e = Edns::new();
            e.set_max_payload(p);
            m.set_edns(e);
        }
        m.to_vec().unwrap()
    }

    #[test]
    fn only_plain_standard_queries_are_simple() {
        let mut k = Vec::new();
        let q = query("A.Mesh.Internal.", RecordType::A, None, 7);
        let s = simple(&q, &mut k).unwrap();
        assert_eq!(&k[..], b"\x01a\x04mesh\x08internal\x00\x00\x01");
        assert_eq!(s.edns, None);
        let q = query("a.mesh.internal.", RecordType::SRV, Some(1400), 7);
        assert_eq!(simple(&q, &mut k).unwrap().edns, Some(1400));
        // A response, two questions, trailing bytes, truncated: hickory's.
        let mut r = query("a.mesh.internal.", RecordType::A, None, 7);
        r[2] |= 0x80;
        assert!(simple(&r, &mut k).is_none());
        let mut two = query("a.mesh.internal.", RecordType::A, None, 7);
        two[5] = 2;
        assert!(simple(&two, &mut k).is_none());
        let mut extra = query("a.mesh.internal.", RecordType::A, None, 7);
        extra.push(0);
        assert!(simple(&extra, &mut k).is_none());
        let q = query("a.mesh.internal.", RecordType::A, None, 7);
        for cut in 0..q.len() {
            assert!(simple(&q[..cut], &mut k).is_none(), "cut at {cut}");
        }
        // DNSSEC OK: hickory's.
        let mut m = Message::query();
        m.add_query(Query::query(
            Name::from_ascii("a.mesh.internal.").unwrap(),
            RecordType::A,
        ));
        let mut e = Edns::new();
        e.set_dnssec_ok(true);
        m.set_edns(e);
        assert!(simple(&m.to_vec().unwrap(), &mut k).is_none());
    }
}
