//! The workload role of the node: the bridge on its /24, meshd's nftables table, forwarding,
//! and the workload namespaces, kept as settings say (`meshctl workloads`, `meshctl workload`),
//! restored at start, moved with the /24, removed at shutdown; and the names the node publishes
//! for them (`NAME.NODE.<domain>`).

use super::platform::Platform;
use super::Node;
use crate::control::{
    ApiFailure, WorkloadAddRequest, WorkloadRemoveRequest, WorkloadView, WorkloadsReport,
    WorkloadsRequest,
};
use crate::mesh::addressing::subnet_string;
use crate::mesh::linux::{NetConfig, NetError};
use crate::state::WorkloadsHost;
use crate::trust::WorkloadName;
use crate::util::unix_now_ms;
use crate::workloads::docker::{self, Container};
use crate::workloads::linux as wl;
use crate::workloads::{self, BridgePlan, WorkloadDef, WorkloadSettings, DEFAULT_BRIDGE};
use std::net::Ipv4Addr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing::{info, warn};

/// What is in place on the host.
pub struct WorkloadRole {
    /// The plan last carried out (the bridge and the table exist).
    active: Option<BridgePlan>,
    /// Why the last attempt failed, for `meshctl workload ls`.
    error: Option<String>,
    /// The bridge whose Docker containers are watched (none with workloads off), and whether
    /// the watcher runs.
    docker_bridge: watch::Sender<Option<String>>,
    docker_watched: bool,
    /// The containers found on it; the node's loop publishes their names when they change.
    pub(super) containers: Arc<watch::Sender<Vec<Container>>>,
}

impl Default for WorkloadRole {
    fn default() -> Self {
        WorkloadRole {
            active: None,
            error: None,
            docker_bridge: watch::channel(None).0,
            docker_watched: false,
            containers: Arc::new(watch::channel(Vec::new()).0),
        }
    }
}

/// Whether bridge `name` has ports that are not meshd's namespaces': containers. Yes
/// when that cannot be told.
async fn has_foreign_ports(nc: &NetConfig, name: &str) -> bool {
    match nc.link_index(name).await {
        Ok(Some(i)) => wl::bridge_ports(nc, i).await.map_or(true, |ports| {
            ports.iter().any(|p| !p.starts_with(workloads::VETH_PREFIX))
        }),
        Ok(None) => false,
        Err(_) => true,
    }
}

/// How often Docker is asked for the containers on the bridge.
const DOCKER_SCAN: Duration = Duration::from_secs(3);

/// Ask Docker for the containers on `bridge` every [`DOCKER_SCAN`] (and when the bridge
/// changes) into `out`, until the node is gone (`bridge`'s sender dropped). Docker not
/// running, or not there, is no containers.
async fn watch_docker(
    mut bridge: watch::Receiver<Option<String>>,
    out: Arc<watch::Sender<Vec<Container>>>,
) {
    let Some(sock) = docker::socket() else {
        info!("DOCKER_HOST is not a Unix socket: Docker containers are not named in mesh DNS");
        return;
    };
    let mut every = tokio::time::interval(DOCKER_SCAN);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    // Docker is asked only while something other than meshd's namespaces is on the bridge: a
    // Docker that is stopped (or only socket-activated) is never started by asking.
    let nc = NetConfig::new().ok();
    loop {
        tokio::select! {
            _ = every.tick() => {}
            changed = bridge.changed() => if changed.is_err() { return },
        }
        let b = bridge.borrow_and_update().clone();
        let containers_possible = match (&b, &nc) {
            (None, _) => false,
            (Some(b), Some(nc)) => has_foreign_ports(nc, b).await,
            (Some(_), None) => true,
        };
        // Workloads off, or nothing but meshd's namespaces on the bridge: no containers.
        let found = match b.filter(|_| containers_possible) {
            None => Vec::new(),
            Some(b) => {
                let sock = sock.clone();
                match tokio::task::spawn_blocking(move || docker::containers_on(&sock, &b)).await {
                    Ok(Ok(found)) => {
                        if std::mem::replace(&mut failing, false) {
                            info!("Docker answers again");
                        }
                        found
                    }
                    // A busy or restarting Docker keeps the names it had: withdrawing them
                    // would spread through the mesh and back for every hiccup.
                    Ok(Err(e)) => {
                        if !std::mem::replace(&mut failing, true) {
                            warn!(error = %e, "cannot ask Docker for the containers on the bridge; their names stay as they were");
                        }
                        continue;
                    }
                    Err(_) => continue,
                }
            }
        };
        out.send_if_modified(|v| {
            let changed = *v != found;
            *v = found;
            changed
        });
    }
}

/// Whether `iptables` shows Docker's `DOCKER-USER` chain (Docker's own rules would drop what
/// comes from the mesh into the bridge: one accept there lets it through).
fn docker_user(op: &str, bridge: &str, tun: &str) -> bool {
    std::process::Command::new("iptables")
        .args([
            op,
            "DOCKER-USER",
            "-i",
            tun,
            "-o",
            bridge,
            "-j",
            "ACCEPT",
            "-m",
            "comment",
            "--comment",
            "meshd: mesh to workloads",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl<P: Platform> Node<P> {
    fn workloads_plan(&self, bridge: &str, host: &WorkloadsHost) -> BridgePlan {
        BridgePlan {
            bridge: bridge.to_string(),
            tun: self.local.config.tun.clone(),
            range: self.view.m().params.range,
            slot: self.local.slot,
            host_forwarded: host.ip_forward_before.as_deref() != Some("0"),
        }
    }

    /// Make the host as settings say: the bridge, the table, forwarding, every namespace, DNS
    /// on the bridge. Idempotent; called at start, on every change and when the /24 moves.
    pub(super) async fn apply_workloads(&mut self) {
        if !self.platform.host_services() {
            return;
        }
        let result = match self.settings.workloads.clone() {
            Some(ws) => self.bring_up(&ws).await,
            None => Ok(()),
        };
        self.workloads.error = result.err().map(|e| {
            warn!(error = %e, "workloads are not (fully) in place");
            e.to_string()
        });
        self.publish_workloads().await;
    }

    async fn bring_up(&mut self, ws: &WorkloadSettings) -> Result<(), NetError> {
        let mut host = self.load_workloads_host();
        if host.ip_forward_before.is_none() {
            host.ip_forward_before = Some(wl::sysctl_get("net.ipv4.ip_forward")?);
            self.save_workloads_host(&host);
        }
        let plan = self.workloads_plan(&ws.bridge, &host);
        if let Some(old) = &self.workloads.active {
            if old.bridge != plan.bridge {
                self.take_down_bridge().await;
            }
        }
        let nc = NetConfig::new()?;
        let bridge = wl::ensure_bridge(&nc, &plan).await?;
        wl::nft_apply(&plan)?;
        if wl::sysctl_get("net.ipv4.ip_forward")? != "1" {
            wl::sysctl_set("net.ipv4.ip_forward", "1")?;
        }
        self.workloads.active = Some(plan.clone());
        self.keep_docker_rule();
        self.workloads
            .docker_bridge
            .send_replace(Some(plan.bridge.clone()));
        if !std::mem::replace(&mut self.workloads.docker_watched, true) {
            tokio::spawn(watch_docker(
                self.workloads.docker_bridge.subscribe(),
                self.workloads.containers.clone(),
            ));
        }
        for port in std::mem::take(&mut host.bridge_ports) {
            if let Err(e) = wl::attach(&nc, &port, bridge).await {
                warn!(port = %port, error = %e, "could not put an interface back on the bridge");
            }
        }
        self.save_workloads_host(&host);
        let name = self.local.cert.name.clone();
        let domain = self.view.m().params.domain.clone();
        let resolv = workloads::resolv_conf(plan.gateway(), &name, &domain);
        let mut first_error = None;
        for w in &ws.namespaces {
            let ip = w.ip(&plan.range, plan.slot);
            if let Err(e) =
                wl::ensure_workload(&nc, (bridge, &plan.bridge), w, ip, plan.gateway(), &resolv)
                    .await
            {
                warn!(workload = %w.name, error = %e, "workload namespace not ready");
                first_error.get_or_insert(NetError::Other(format!("workload {}: {e}", w.name)));
            }
        }
        if self.dns.set_bridge(Some((plan.bridge.clone(), bridge))) {
            self.restart_dns().await;
        }
        info!(bridge = %plan.bridge, subnet = %plan.subnet(), namespaces = ws.namespaces.len(), "workloads bridge up");
        first_error.map_or(Ok(()), Err)
    }

    /// Docker, started after meshd (or restarted), makes its chains afresh: the mesh's way to
    /// the bridge through `DOCKER-USER` is checked at every endpoint rescan too.
    pub(super) fn keep_docker_rule(&self) {
        let Some(plan) = &self.workloads.active else {
            return;
        };
        if !docker_user("-C", &plan.bridge, &plan.tun) && docker_user("-I", &plan.bridge, &plan.tun)
        {
            info!("let the mesh through Docker's DOCKER-USER chain to the bridge");
        }
    }

    /// What meshd changed on the host; a file that cannot be read is reported and taken as
    /// nothing (the bridge must still come up).
    fn load_workloads_host(&self) -> WorkloadsHost {
        self.local
            .state
            .load_workloads_host()
            .unwrap_or_else(|e| {
                warn!(error = %e, "workloads.host.json unreadable: forwarding and Docker's ports on the bridge are not restored");
                None
            })
            .unwrap_or_default()
    }

    fn save_workloads_host(&self, host: &WorkloadsHost) {
        if let Err(e) = self.local.state.save_workloads_host(host) {
            warn!(error = %e, "saving workloads.host.json failed");
        }
    }

    /// Remove the bridge, the table and the Docker rule, and give forwarding back as it was;
    /// the namespaces stay (their processes keep running) and are attached again next time, as
    /// are other interfaces that were on the bridge (Docker's containers).
    pub(super) async fn take_down_bridge(&mut self) {
        let Some(plan) = self.workloads.active.take() else {
            return;
        };
        self.workloads.docker_bridge.send_replace(None);
        let mut host = self.load_workloads_host();
        if let Ok(nc) = NetConfig::new() {
            if let Ok(Some(i)) = nc.link_index(&plan.bridge).await {
                let ours: Vec<String> = self
                    .settings
                    .workloads
                    .iter()
                    .flat_map(|w| w.namespaces.iter().map(|n| n.veth()))
                    .collect();
                host.bridge_ports = wl::bridge_ports(&nc, i)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .filter(|p| !ours.contains(p))
                    .collect();
            }
            if let Err(e) = wl::delete_link(&nc, &plan.bridge).await {
                warn!(error = %e, "removing the workloads bridge failed");
            }
        }
        if let Err(e) = wl::nft_remove() {
            warn!(error = %e, "removing meshd's nftables table failed");
        }
        // Every copy (a crash between insert and save may have left two); a few at most.
        for _ in 0..8 {
            if !docker_user("-D", &plan.bridge, &plan.tun) {
                break;
            }
        }
        if host.ip_forward_before.as_deref() == Some("0") {
            if let Err(e) = wl::sysctl_set("net.ipv4.ip_forward", "0") {
                warn!(error = %e, "turning forwarding back off failed");
            }
        }
        host.ip_forward_before = None;
        self.save_workloads_host(&host);
        info!(bridge = %plan.bridge, "workloads bridge removed");
    }

    /// The workloads' names, signed and gossiped (empty with workloads off).
    pub(super) async fn publish_workloads(&mut self) {
        let range = self.view.m().params.range;
        let names = self
            .settings
            .workloads
            .iter()
            .flat_map(|w| w.namespaces.iter())
            .map(|w| WorkloadName {
                name: w.name.clone(),
                ip: w.ip(&range, self.local.slot),
            })
            .chain(self.container_names())
            .collect();
        let p = self.publisher.workloads(names, unix_now_ms());
        self.publish(p).await;
    }

    /// The Docker containers on the bridge that can be named: an address of this node's /24
    /// (not .0, .1 or .255), a name that is a DNS label once lower-cased and no namespace's.
    fn container_names(&self) -> Vec<WorkloadName> {
        let Some(ws) = &self.settings.workloads else {
            return Vec::new();
        };
        let range = self.view.m().params.range;
        let mut names: Vec<WorkloadName> = Vec::new();
        for c in self.workloads.containers.borrow().iter() {
            let name = c.name.to_ascii_lowercase();
            let ours = range.slot_of(c.ip) == Some(self.local.slot)
                && !matches!(c.ip.octets()[3], 0 | 1 | 255);
            if ours
                && workloads::valid_name(&name)
                && !ws.namespaces.iter().any(|n| n.name == name)
                && !names.iter().any(|n| n.name == name)
            {
                names.push(WorkloadName { name, ip: c.ip });
            }
        }
        names
    }

    pub(super) fn workloads_report(&self) -> WorkloadsReport {
        let m = self.view.m();
        let range = m.params.range;
        let me = self
            .view
            .snapshot()
            .member(&self.local.cert.node_id)
            .map(|r| r.dns_name.clone())
            .unwrap_or_else(|| self.local.cert.name.clone());
        let ws = self.settings.workloads.as_ref();
        WorkloadsReport {
            enabled: ws.is_some(),
            bridge: ws.map(|w| w.bridge.clone()),
            subnet: subnet_string(&range, self.local.slot),
            gateway: range.node_ip(self.local.slot).to_string(),
            workloads: ws
                .map(|w| {
                    let view =
                        |name: &str, ip: Ipv4Addr, present: bool, container: bool| WorkloadView {
                            name: name.to_string(),
                            ip: ip.to_string(),
                            dns: format!("{name}.{me}.{}", m.params.domain),
                            present,
                            container,
                        };
                    w.namespaces
                        .iter()
                        .map(|n| {
                            let ip = n.ip(&range, self.local.slot);
                            view(&n.name, ip, wl::netns_exists(&n.name), false)
                        })
                        .chain(
                            self.container_names()
                                .iter()
                                .map(|c| view(&c.name, c.ip, true, true)),
                        )
                        .collect()
                })
                .unwrap_or_default(),
            forged_dropped: wl::nft_forged_packets().unwrap_or(0),
            error: self.workloads.error.clone(),
        }
    }

    fn workloads_on(&self) -> Result<&WorkloadSettings, ApiFailure> {
        self.settings.workloads.as_ref().ok_or_else(|| {
            ApiFailure::conflict("workloads are off on this node: meshctl workloads enable")
        })
    }

    pub(super) async fn workloads_set(
        &mut self,
        r: WorkloadsRequest,
    ) -> Result<WorkloadsReport, ApiFailure> {
        if !self.platform.host_services() {
            return Err(ApiFailure::conflict("workloads need a real host"));
        }
        if r.enable {
            let bridge = r.bridge.unwrap_or_else(|| {
                self.settings
                    .workloads
                    .as_ref()
                    .map_or(DEFAULT_BRIDGE.to_string(), |w| w.bridge.clone())
            });
            if !crate::util::is_ifname(&bridge) || bridge == self.local.config.tun {
                return Err(ApiFailure::bad_request(format!(
                    "--bridge {bridge:?} is not a free interface name: 1-15 letters, digits, '-' and '_', not the TUN device's"
                )));
            }
            let namespaces = self
                .settings
                .workloads
                .take()
                .map(|w| w.namespaces)
                .unwrap_or_default();
            self.settings.workloads = Some(WorkloadSettings { bridge, namespaces });
        } else {
            self.take_down_bridge().await;
            if let Some(ws) = self.settings.workloads.take() {
                if let Ok(nc) = NetConfig::new() {
                    for w in &ws.namespaces {
                        if let Err(e) = wl::remove_workload(&nc, w).await {
                            warn!(workload = %w.name, error = %e, "removing a workload failed");
                        }
                    }
                }
            }
            if self.dns.set_bridge(None) {
                self.restart_dns().await;
            }
        }
        self.save_settings()?;
        self.apply_workloads().await;
        let report = self.workloads_report();
        if let (true, Some(e)) = (r.enable, &report.error) {
            return Err(ApiFailure::internal(format!(
                "workloads enabled (saved) but not in place: {e}"
            )));
        }
        info!(enabled = r.enable, "workloads setting changed");
        Ok(report)
    }

    pub(super) async fn workload_add(
        &mut self,
        r: WorkloadAddRequest,
    ) -> Result<WorkloadView, ApiFailure> {
        let ws = self.workloads_on()?;
        let range = self.view.m().params.range;
        let ip =
            r.ip.as_deref()
                .map(|s| {
                    s.parse::<Ipv4Addr>().map_err(|_| {
                        ApiFailure::bad_request(format!("--ip {s:?} is not an IPv4 address"))
                    })
                })
                .transpose()?;
        let def = workloads::plan_add(&ws.namespaces, &r.name, ip, &range, self.local.slot)
            .map_err(|e| ApiFailure::bad_request(e.to_string()))?;
        if wl::netns_exists(&def.name) {
            return Err(ApiFailure::conflict(format!(
                "a network namespace named {:?} exists already (not made by meshd): pick another name",
                def.name
            )));
        }
        self.make_workload(def.clone()).await?;
        self.workload_view(&def.name)
    }

    async fn make_workload(&mut self, def: WorkloadDef) -> Result<(), ApiFailure> {
        let Some(plan) = self.workloads.active.clone() else {
            return Err(ApiFailure::internal(format!(
                "the workloads bridge is not in place: {}",
                self.workloads.error.as_deref().unwrap_or("unknown")
            )));
        };
        let nc = NetConfig::new().map_err(|e| ApiFailure::internal(e.to_string()))?;
        let bridge = nc
            .index(&plan.bridge)
            .await
            .map_err(|e| ApiFailure::internal(e.to_string()))?;
        let resolv = workloads::resolv_conf(
            plan.gateway(),
            &self.local.cert.name,
            &self.view.m().params.domain,
        );
        let ip = def.ip(&plan.range, plan.slot);
        if let Err(e) = wl::ensure_workload(
            &nc,
            (bridge, &plan.bridge),
            &def,
            ip,
            plan.gateway(),
            &resolv,
        )
        .await
        {
            // Nothing half-made stays behind.
            let _ = wl::remove_workload(&nc, &def).await;
            return Err(ApiFailure::internal(format!(
                "making workload {}: {e}",
                def.name
            )));
        }
        if let Some(ws) = self.settings.workloads.as_mut() {
            ws.namespaces.push(def.clone());
        }
        self.save_settings()?;
        info!(workload = %def.name, address = %ip, "workload namespace ready");
        self.publish_workloads().await;
        Ok(())
    }

    fn workload_view(&self, name: &str) -> Result<WorkloadView, ApiFailure> {
        self.workloads_report()
            .workloads
            .into_iter()
            .find(|w| w.name == name)
            .ok_or_else(|| ApiFailure::not_found(format!("no workload named {name:?}")))
    }

    pub(super) async fn workload_remove(
        &mut self,
        r: WorkloadRemoveRequest,
    ) -> Result<WorkloadView, ApiFailure> {
        let view = self.workload_view(&r.name)?;
        let ws = self.workloads_on()?;
        // The report lists Docker's containers too; those are Docker's to remove.
        let Some(def) = ws.namespaces.iter().find(|w| w.name == r.name).cloned() else {
            return Err(ApiFailure::conflict(format!(
                "{} is a Docker container, not a namespace of meshd's: remove it with docker rm",
                r.name
            )));
        };
        let nc = NetConfig::new().map_err(|e| ApiFailure::internal(e.to_string()))?;
        wl::remove_workload(&nc, &def)
            .await
            .map_err(|e| ApiFailure::internal(format!("removing workload {}: {e}", r.name)))?;
        if let Some(ws) = self.settings.workloads.as_mut() {
            ws.namespaces.retain(|w| w.name != r.name);
        }
        self.save_settings()?;
        info!(workload = %r.name, "workload removed");
        self.publish_workloads().await;
        Ok(view)
    }
}
