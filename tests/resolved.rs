//! Host DNS integration: meshd registers the mesh domain with systemd-resolved over D-Bus and
//! removes it on shutdown. systemd-resolved is played by a mock on a private bus
//! (dbus-daemon, Debian package dbus-daemon) that records every call.

mod common;

use common::Lab;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

#[derive(Clone, Default)]
struct Mock {
    calls: Arc<Mutex<Vec<String>>>,
}

#[zbus::interface(name = "org.freedesktop.resolve1.Manager")]
impl Mock {
    #[zbus(name = "SetLinkDNS")]
    fn set_link_dns(&self, ifindex: i32, addrs: Vec<(i32, Vec<u8>)>) {
        let a: Vec<String> = addrs
            .iter()
            .map(|(fam, b)| {
                format!(
                    "{fam}:{}",
                    b.iter()
                        .map(|x| x.to_string())
                        .collect::<Vec<_>>()
                        .join(".")
                )
            })
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push(format!("SetLinkDNS {ifindex} {}", a.join(",")));
    }
    #[zbus(name = "SetLinkDomains")]
    fn set_link_domains(&self, ifindex: i32, domains: Vec<(String, bool)>) {
        let d: Vec<String> = domains
            .iter()
            .map(|(n, route)| if *route { format!("~{n}") } else { n.clone() })
            .collect();
        self.calls
            .lock()
            .unwrap()
            .push(format!("SetLinkDomains {ifindex} {}", d.join(",")));
    }
    #[zbus(name = "SetLinkDefaultRoute")]
    fn set_link_default_route(&self, ifindex: i32, enable: bool) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("SetLinkDefaultRoute {ifindex} {enable}"));
    }
    #[zbus(name = "SetLinkLLMNR")]
    fn set_link_llmnr(&self, ifindex: i32, mode: String) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("SetLinkLLMNR {ifindex} {mode}"));
    }
    #[zbus(name = "SetLinkMulticastDNS")]
    fn set_link_mdns(&self, ifindex: i32, mode: String) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("SetLinkMulticastDNS {ifindex} {mode}"));
    }
    #[zbus(name = "RevertLink")]
    fn revert_link(&self, ifindex: i32) {
        self.calls
            .lock()
            .unwrap()
            .push(format!("RevertLink {ifindex}"));
    }
}

struct Bus(Child);
impl Drop for Bus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn the_mesh_domain_is_registered_with_systemd_resolved_and_removed_on_exit() {
    let mut lab = Lab::new("resolved", 1);
    let sock = lab.dir.path().join("system_bus_socket");
    let conf = lab.dir.path().join("bus.conf");
    std::fs::write(
        &conf,
        format!(
            r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-BUS Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>
</busconfig>"#,
            sock.display()
        ),
    )
    .unwrap();
    let _bus = Bus(Command::new("dbus-daemon")
        .arg(format!("--config-file={}", conf.display()))
        .arg("--nofork")
        .stdout(Stdio::null())
        .spawn()
        .expect("dbus-daemon (Debian package dbus-daemon)"));
    lab.wait_for("the bus socket", Duration::from_secs(10), || sock.exists());
    let address = format!("unix:path={}", sock.display());

    let mock = Mock::default();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    let _conn = rt
        .block_on(async {
            zbus::connection::Builder::address(address.as_str())?
                .name("org.freedesktop.resolve1")?
                .serve_at("/org/freedesktop/resolve1", mock.clone())?
                .build()
                .await
        })
        .expect("mock resolved on the private bus");

    lab.env.push(("DBUS_SYSTEM_BUS_ADDRESS".into(), address));
    lab.init(0, "alpha", &["--domain", "corp.internal"]);
    let calls = || mock.calls.lock().unwrap().clone();
    lab.wait_for("SetLinkDomains", Duration::from_secs(10), || {
        calls().iter().any(|c| c.starts_with("SetLinkDomains"))
    });
    let ifindex = {
        let o = lab.sh(0, "ip", &["-o", "link", "show", "mesh0"]);
        String::from_utf8_lossy(&o.stdout)
            .split(':')
            .next()
            .unwrap()
            .trim()
            .to_string()
    };
    let ip = lab.mesh_ip(0);
    let c = calls();
    assert!(c.contains(&format!("SetLinkDNS {ifindex} 2:{ip}")), "{c:?}");
    assert!(
        c.contains(&format!(
            "SetLinkDomains {ifindex} ~corp.internal,corp.internal"
        )),
        "{c:?}"
    );
    assert!(
        c.contains(&format!("SetLinkDefaultRoute {ifindex} false")),
        "{c:?}"
    );
    let st = lab.status(0);
    assert!(st.dns.host.starts_with("systemd-resolved"), "{:?}", st.dns);

    lab.stop(0);
    assert!(
        calls().contains(&format!("RevertLink {ifindex}")),
        "{:?}",
        calls()
    );
}
