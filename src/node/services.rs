//! `meshctl service`: this node's services, persisted in settings.json, published as a signed
//! record and answered by every node's DNS. What a request may ask for is checked here, purely.

use crate::control::{ApiFailure, ServiceAddRequest};
use crate::dns::zone::MAX_SERVICE_NAME;
use crate::id::MeshRange;
use crate::mesh::addressing::subnet_string;
use crate::trust::ServiceDef;
use crate::util::is_dns_label;

/// The service a `meshctl service add` asks for, on the node holding `own_slot`.
pub fn service_def(
    r: &ServiceAddRequest,
    range: &MeshRange,
    own_slot: u32,
) -> Result<ServiceDef, ApiFailure> {
    if !is_dns_label(&r.name) || r.name.len() > MAX_SERVICE_NAME {
        return Err(ApiFailure::bad_request(format!(
            "service name {:?} is not valid: use 1-{MAX_SERVICE_NAME} of a-z, 0-9 and '-', not \
             starting or ending with '-' (its SRV record _NAME._tcp must fit in a DNS label)",
            r.name
        )));
    }
    if r.port == 0 {
        return Err(ApiFailure::bad_request(
            "--port must be between 1 and 65535",
        ));
    }
    if let Some(a) = r.address {
        let host = a.octets()[3];
        if range.slot_of(a) != Some(own_slot) || host == 0 || host == 255 {
            return Err(ApiFailure::bad_request(format!(
                "--address {a} is not an address of this node's subnet {}: use .1-.254 of it",
                subnet_string(range, own_slot)
            )));
        }
    }
    Ok(ServiceDef {
        name: r.name.clone(),
        port: r.port,
        address: r.address,
    })
}

/// After a move to another /24: services published at an explicit address of the old one are
/// no longer answered anywhere. Say so; the operator re-adds them (their workloads need new
/// addresses too).
pub fn warn_outside_subnet(services: &[ServiceDef], range: &MeshRange, own_slot: u32) {
    for s in services {
        if let Some(ip) = s.address.filter(|ip| range.slot_of(*ip) != Some(own_slot)) {
            tracing::warn!(
                service = %s.name,
                address = %ip,
                subnet = %subnet_string(range, own_slot),
                "service address is outside this node's new subnet; DNS no longer answers it: \
                 meshctl service add {} --port {} --address <an address of the new subnet>",
                s.name,
                s.port
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_requests_are_checked_against_the_nodes_subnet() {
        let range: MeshRange = "10.210.0.0/16".parse().unwrap();
        let req = |name: &str, port: u16, address: Option<&str>| ServiceAddRequest {
            name: name.into(),
            port,
            address: address.map(|a| a.parse().unwrap()),
        };
        let ok = service_def(&req("web", 80, Some("10.210.5.7")), &range, 5).unwrap();
        assert_eq!(ok.address, Some("10.210.5.7".parse().unwrap()));
        assert!(service_def(&req("web", 80, None), &range, 5).is_ok());
        for (r, why) in [
            (req("Web", 80, None), "is not valid"),
            (
                req(&"x".repeat(MAX_SERVICE_NAME + 1), 80, None),
                "is not valid",
            ),
            (req("web", 0, None), "--port"),
            (
                req("web", 80, Some("10.210.6.7")),
                "not an address of this node's subnet 10.210.5.0/24",
            ),
            (req("web", 80, Some("10.210.5.255")), "not an address"),
            (req("web", 80, Some("10.210.5.0")), "not an address"),
        ] {
            let e = service_def(&r, &range, 5).unwrap_err();
            assert_eq!(e.status, 400);
            assert!(e.message.contains(why), "{}", e.message);
        }
    }
}
