//! Prometheus metrics: the text exposition format (a small writer, escaping done once here) and
//! the process-wide counters of the parts that have no other place to count (mesh DNS answers,
//! connections accepted by the gateway, proxy and mesh listeners). One meshd per process in
//! production, so process-wide is per node.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// Mesh DNS answers by response code.
pub static DNS_ANSWERS: [AtomicU64; 5] = [
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
    AtomicU64::new(0),
];
/// The `result` label of each slot of [`DNS_ANSWERS`].
pub const DNS_RESULTS: [&str; 5] = ["noerror", "nxdomain", "servfail", "refused", "other"];

/// Count one DNS answer (`code`: the response code's number).
pub fn dns_answer(code: u16) {
    let i = match code {
        0 => 0,
        3 => 1,
        2 => 2,
        5 => 3,
        _ => 4,
    };
    DNS_ANSWERS[i].fetch_add(1, Ordering::Relaxed);
}

/// Gossip traffic (chitchat's messages through the tunnels), both ways.
pub struct GossipTraffic {
    pub sent_messages: AtomicU64,
    pub sent_bytes: AtomicU64,
    pub received_messages: AtomicU64,
    pub received_bytes: AtomicU64,
}

impl GossipTraffic {
    pub fn sent(&self, bytes: usize) {
        self.sent_messages.fetch_add(1, Ordering::Relaxed);
        self.sent_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
    }
    pub fn received(&self, bytes: usize) {
        self.received_messages.fetch_add(1, Ordering::Relaxed);
        self.received_bytes
            .fetch_add(bytes as u64, Ordering::Relaxed);
    }
}

pub static GOSSIP: GossipTraffic = GossipTraffic {
    sent_messages: AtomicU64::new(0),
    sent_bytes: AtomicU64::new(0),
    received_messages: AtomicU64::new(0),
    received_bytes: AtomicU64::new(0),
};

/// Connections per listener: (accepted, refused at a limit).
static CONNECTIONS: Mutex<BTreeMap<&'static str, (u64, u64)>> = Mutex::new(BTreeMap::new());

/// Count a connection to the listener `what` (accepted, or refused at a limit).
pub fn connection(what: &'static str, accepted: bool) {
    let mut c = CONNECTIONS.lock().unwrap();
    let e = c.entry(what).or_default();
    if accepted {
        e.0 += 1;
    } else {
        e.1 += 1;
    }
}

/// Every listener's (name, accepted, refused).
pub fn connections() -> Vec<(&'static str, u64, u64)> {
    CONNECTIONS
        .lock()
        .unwrap()
        .iter()
        .map(|(w, (a, r))| (*w, *a, *r))
        .collect()
}

/// A Prometheus text exposition (format 0.0.4) being written.
#[derive(Default)]
pub struct Text {
    out: String,
}

/// The kind of a metric family.
#[derive(Clone, Copy)]
pub enum Kind {
    Counter,
    Gauge,
}

impl Text {
    /// Start a family: its `# HELP` and `# TYPE` lines.
    pub fn family(&mut self, name: &str, kind: Kind, help: &str) -> &mut Self {
        let kind = match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        };
        let help = help.replace('\\', "\\\\").replace('\n', "\\n");
        let _ = writeln!(self.out, "# HELP {name} {help}");
        let _ = writeln!(self.out, "# TYPE {name} {kind}");
        self
    }

    /// One sample of the current family.
    pub fn sample(&mut self, name: &str, labels: &[(&str, &str)], value: f64) -> &mut Self {
        self.out.push_str(name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                let v = v
                    .replace('\\', "\\\\")
                    .replace('"', "\\\"")
                    .replace('\n', "\\n");
                let _ = write!(self.out, "{k}=\"{v}\"");
            }
            self.out.push('}');
        }
        if value.fract() == 0.0 && value.abs() < 1e15 {
            let _ = writeln!(self.out, " {}", value as i64);
        } else {
            let _ = writeln!(self.out, " {value}");
        }
        self
    }

    pub fn finish(self) -> String {
        self.out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_the_text_format_with_escaped_labels() {
        let mut t = Text::default();
        t.family("meshd_x_total", Kind::Counter, "Things.\nMore.")
            .sample("meshd_x_total", &[("peer", "a\"b\\c")], 3.0)
            .sample("meshd_x_total", &[], 0.5);
        assert_eq!(
            t.finish(),
            "# HELP meshd_x_total Things.\\nMore.\n# TYPE meshd_x_total counter\n\
             meshd_x_total{peer=\"a\\\"b\\\\c\"} 3\nmeshd_x_total 0.5\n"
        );
    }

    #[test]
    fn counts_dns_answers_and_connections() {
        let before = DNS_ANSWERS[1].load(Ordering::Relaxed);
        dns_answer(3);
        assert_eq!(DNS_ANSWERS[1].load(Ordering::Relaxed), before + 1);
        connection("test listener", true);
        connection("test listener", false);
        let c = connections();
        let (_, a, r) = c.iter().find(|(w, _, _)| *w == "test listener").unwrap();
        assert!(*a >= 1 && *r >= 1);
    }
}
