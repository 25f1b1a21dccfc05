//! A fleet rolled out by automation: 30 machines, `meshd init` on one and `meshd join` on the
//! other 29 at the same moment. Every node must list every member and reach every other, and
//! no node may report a live one offline on the way. (benches/scale.sh measures the same at 100
//! nodes; here the bound is what the bench shows with a wide margin on a 2-core machine.)

mod common;

use common::fleet::census;
use common::Lab;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

const N: usize = 30;
const BOUND: Duration = Duration::from_secs(30);

#[test]
fn thirty_simultaneous_joins_form_a_full_mesh_without_false_offline_reports() {
    let mut lab = Lab::new("fleet", N);
    lab.env.push(("MESHD_LOG".into(), "info".into()));
    let hosts: Vec<usize> = (0..N).collect();
    let start = lab.form_at_once(N);
    let mut offline = BTreeSet::new();
    let mut members_at = None;
    let mut last = String::new();
    let reach_at = loop {
        assert!(
            start.elapsed() < BOUND,
            "not formed within {BOUND:?}: {last}"
        );
        let st = lab.statuses(&hosts);
        let c = census(&hosts, &st, N);
        offline.extend(c.offline);
        last = format!("{}/{N} nodes list every member", c.complete);
        if c.complete == N && c.ips.len() == N {
            members_at.get_or_insert(start.elapsed());
            let ips: Vec<_> = hosts.iter().map(|h| c.ips[h]).collect();
            let missing = lab.unreachable_pairs(&hosts, &ips);
            if missing.is_empty() {
                break start.elapsed();
            }
            last += &format!(
                ", {} pairs unreachable, e.g. {:?}",
                missing.len(),
                &missing[..1]
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    println!(
        "{N} nodes: full membership after {:.1}s, all pairs reachable after {:.1}s",
        members_at.unwrap().as_secs_f64(),
        reach_at.as_secs_f64()
    );
    // A few more seconds of watching: still nobody reported offline.
    let until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < until {
        offline.extend(census(&hosts, &lab.statuses(&hosts), N).offline);
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        offline.is_empty(),
        "live nodes reported offline: {offline:?}"
    );
    for s in lab.statuses(&hosts).into_iter().flatten() {
        assert_eq!(s.peers.len(), N - 1, "{}", s.me.name);
        assert!(
            s.peers.iter().all(|p| p.online),
            "{}: {:?}",
            s.me.name,
            s.peers
        );
    }
}
