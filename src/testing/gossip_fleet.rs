//! The membership layer of a whole fleet in one process, for sizes real processes cannot reach
//! on one machine: per node the real gossip glue, membership view, snapshot and spreading
//! (outreach and news pushes) that a node's tick runs, over chitchat's in-process transport
//! (no tunnels: what is measured is how membership converges, not the data plane). Every node
//! publishes a real certificate, record, services and routes, so gossip carries (and verifies)
//! what it carries in a real mesh.
//!
//! Formation as in a rollout: the first node admitted everyone (it knows every certificate and
//! claim); each other node starts knowing itself and the first node (its join acceptance).
//!
//! Run it on tokio's paused clock: gossip, chitchat's failure detector and the spreading rules
//! all keep tokio's time, so the figures count protocol time, not how long one machine takes to
//! play a thousand nodes (signature checks alone are a million at 500 nodes).

use super::fixtures::{World, T0};
use crate::constants::{GOSSIP_PORT, RECONCILE_TICK};
use crate::gossip::chitchat_glue::{KEY_CERT, KEY_RECORD, KEY_ROUTES, KEY_SERVICES};
use crate::gossip::{Gossip, GossipConfig, Membership};
use crate::node::outreach::Spread;
use crate::node::view::View;
use crate::trust::{NodeKeys, ServiceDef, Signed};
use chitchat::transport::ChannelTransport;
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// What a formation measured.
#[derive(Debug)]
pub struct Figures {
    pub nodes: usize,
    /// From the start until every node's view lists every member.
    pub converged_after: Duration,
    /// Gossip per node, once converged (chitchat messages, before WireGuard framing).
    pub bytes_per_node_per_sec: f64,
    pub messages_per_node_per_sec: f64,
    /// Mean size of a gossip message once converged.
    pub mean_message: f64,
}

struct Start {
    keys: NodeKeys,
    view: Membership,
    initial: Vec<(String, String)>,
    addr: SocketAddr,
    seeds: Vec<SocketAddr>,
}

/// Form a fleet of `n` and measure it; `Err` says how far it got by `deadline`.
pub async fn form(n: usize, deadline: Duration, idle: Duration) -> Result<Figures, String> {
    let world = World::new("10.128.0.0/9");
    let range = world.params.range;
    let nodes: Vec<_> = (0..n)
        .map(|i| world.node(&format!("n{i}"), T0 + 1 + i as u64))
        .collect();
    // The first node admits everyone, in turn.
    let mut seed_view = Membership::new(world.params.clone(), nodes[0].1.clone(), T0);
    seed_view.set_admitted_k(nodes[0].1.node_id, 0);
    let mut claims = Vec::new();
    for (i, (_, c)) in nodes.iter().enumerate() {
        let id = seed_view
            .ingest_cert(&c.raw, T0)
            .map_err(|e| e.to_string())?;
        let k = if i == 0 {
            0
        } else {
            seed_view
                .claim_for_newcomer(&c.wireguard)
                .ok_or("range full")?
        };
        seed_view.set_admitted_k(id, k);
        claims.push(k);
    }
    let assign = seed_view.assignments();
    let addr_of = |i: usize| {
        let slot = assign[&nodes[i].1.node_id].slot;
        SocketAddr::from((range.node_ip(slot), GOSSIP_PORT))
    };
    let statements = |i: usize| -> (Signed, Signed, Signed) {
        let k = &nodes[i].0;
        let ep = SocketAddr::from(([198, 18, (i / 250) as u8, (i % 250) as u8 + 1], 51820));
        let web = ServiceDef {
            name: "web".into(),
            port: 80,
            address: None,
        };
        (
            World::record(k, 1, claims[i], vec![ep]),
            World::services(k, 1, vec![web]),
            World::routes(k, 1, vec![format!("app{i}.example.com")], false),
        )
    };
    let seed_record = statements(0).0;
    let mut starts = Vec::with_capacity(n);
    for i in 0..n {
        let (keys, cert) = (&nodes[i].0, &nodes[i].1);
        let (record, services, routes) = statements(i);
        let mut view = if i == 0 {
            seed_view.clone()
        } else {
            let mut v = Membership::new(world.params.clone(), cert.clone(), T0);
            v.set_admitted_k(cert.node_id, claims[i]);
            let id0 = v
                .ingest_cert(&nodes[0].1.raw, T0)
                .map_err(|e| e.to_string())?;
            v.ingest_record(id0, &seed_record)
                .map_err(|e| e.to_string())?;
            v
        };
        let me = cert.node_id;
        view.ingest_record(me, &record).map_err(|e| e.to_string())?;
        view.ingest_services(me, &services)
            .map_err(|e| e.to_string())?;
        view.ingest_routes(me, &routes).map_err(|e| e.to_string())?;
        let seeds = if i == 0 {
            (1..n).map(addr_of).collect()
        } else {
            vec![addr_of(0)]
        };
        let initial = vec![
            (KEY_CERT.to_string(), cert.raw.to_b64()),
            (KEY_RECORD.to_string(), record.to_b64()),
            (KEY_SERVICES.to_string(), services.to_b64()),
            (KEY_ROUTES.to_string(), routes.to_b64()),
        ];
        starts.push(Start {
            keys: keys.clone(),
            view,
            initial,
            addr: addr_of(i),
            seeds,
        });
    }

    let transport = ChannelTransport::with_mtu(65_507);
    let complete = Arc::new(AtomicUsize::new(0));
    let counts: Arc<Vec<AtomicUsize>> = Arc::new((0..n).map(|_| AtomicUsize::new(0)).collect());
    let stop = CancellationToken::new();
    let started = Instant::now();
    let mut tasks = Vec::new();
    for (i, s) in starts.into_iter().enumerate() {
        let me = s.view.self_id;
        let cfg = GossipConfig {
            node_id: me,
            addr: s.addr,
            cluster_id: "meshd-fleet".into(),
            seeds: s.seeds,
            initial: s.initial,
        };
        let gossip = Gossip::start(cfg, &transport)
            .await
            .map_err(|e| e.to_string())?;
        let (complete, stop, counts) = (complete.clone(), stop.clone(), counts.clone());
        drop(s.keys);
        tasks.push(tokio::spawn(drive(
            s.view, gossip, n, complete, stop, counts, i,
        )));
    }

    let by = started + deadline;
    while complete.load(Ordering::Relaxed) < n {
        if Instant::now() > by {
            stop.cancel();
            let short: Vec<String> = counts
                .iter()
                .enumerate()
                .filter(|(_, c)| c.load(Ordering::Relaxed) < n)
                .take(10)
                .map(|(i, c)| format!("n{i}: {}", c.load(Ordering::Relaxed)))
                .collect();
            return Err(format!(
                "{} of {n} views complete after {deadline:?}; members known by the others: {}",
                complete.load(Ordering::Relaxed),
                short.join(", ")
            ));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let converged_after = started.elapsed();
    let s0 = transport.statistics();
    let t0 = Instant::now();
    tokio::time::sleep(idle).await;
    let s1 = transport.statistics();
    let secs = t0.elapsed().as_secs_f64();
    stop.cancel();
    for t in tasks {
        let _ = t.await;
    }
    let bytes = (s1.num_bytes_total - s0.num_bytes_total) as f64;
    let messages = (s1.num_messages_total - s0.num_messages_total) as f64;
    Ok(Figures {
        nodes: n,
        converged_after,
        // Each message is sent by one node and received by another: both count it.
        bytes_per_node_per_sec: 2.0 * bytes / secs / n as f64,
        messages_per_node_per_sec: 2.0 * messages / secs / n as f64,
        mean_message: bytes / messages.max(1.0),
    })
}

/// One node's tick, as the node runs it (without probes, tunnels or I/O beyond gossip).
async fn drive(
    m: Membership,
    mut gossip: Gossip,
    n: usize,
    complete: Arc<AtomicUsize>,
    stop: CancellationToken,
    counts: Arc<Vec<AtomicUsize>>,
    me: usize,
) {
    let mut view = View::new(m, Instant::now().into_std());
    let mut spread = Spread::default();
    let mut counted = false;
    let mut tick = tokio::time::interval(RECONCILE_TICK);
    let none = HashMap::new();
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = tick.tick() => {}
        }
        spread.take_in(&mut gossip, view.m_mut(), T0, &none).await;
        let _ = view.tick(T0, false);
        spread.send(&gossip, view.snapshot(), Instant::now().into_std());
        counts[me].store(view.snapshot().members.len(), Ordering::Relaxed);
        if !counted && view.snapshot().members.len() == n {
            counted = true;
            complete.fetch_add(1, Ordering::Relaxed);
        }
    }
    gossip.shutdown().await;
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    /// A fleet of 150 forms in the in-memory harness (benches/gossip_scale.rs runs 500 and
    /// 1,000): every view lists every member within a few gossip rounds of protocol time, and
    /// idle gossip per node stays small.
    #[tokio::test(start_paused = true)]
    async fn a_fleet_of_150_converges_in_seconds_and_idles_cheaply() {
        let f = super::form(150, Duration::from_secs(60), Duration::from_secs(20))
            .await
            .unwrap();
        println!("{f:?}");
        assert!(f.converged_after < Duration::from_secs(20), "{f:?}");
        assert!(f.bytes_per_node_per_sec < 30_000.0, "{f:?}");
    }
}
