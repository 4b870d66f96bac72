use super::*;

fn key(n: u8) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode([n; 32])
}

fn inst(id: &str, ip: &str, k: u8, updated_ms: u64, origin: u32) -> InstanceRecord {
    InstanceRecord {
        instance_id: id.into(),
        app_id: "aa".into(),
        ip: ip.parse().unwrap(),
        public_key: key(k),
        port_policy: PortPolicy::default(),
        reg_time_ms: updated_ms,
        ip_since_ms: updated_ms,
        updated_ms,
        origin,
        last_seen_ms: 0,
        deleted: false,
    }
}

fn node(id: u32, updated_ms: u64, last_seen_ms: u64) -> NodeRecord {
    NodeRecord {
        id,
        url: format!("https://n{id}"),
        wg_public_key: key(100 + id as u8),
        wg_ip: Ipv4Addr::new(10, 0, 0, 200 + id as u8),
        wg_endpoint: format!("192.0.2.{id}:51820"),
        updated_ms,
        last_seen_ms,
    }
}

/// Merging in either order converges to the same state (the newer write wins, ties by origin).
#[test]
fn last_writer_wins_is_order_independent() {
    let older = inst("01", "10.0.0.2", 1, 1000, 2);
    let newer = inst("01", "10.0.0.2", 2, 2000, 1);
    let tie_low = inst("01", "10.0.0.2", 3, 3000, 1);
    let tie_high = inst("01", "10.0.0.2", 4, 3000, 3);
    for order in [
        vec![&older, &newer, &tie_low, &tie_high],
        vec![&tie_high, &tie_low, &newer, &older],
        vec![&newer, &tie_high, &older, &tie_low],
    ] {
        let mut s = Store::default();
        for r in order {
            s.merge_instance(r.clone());
        }
        assert_eq!(
            s.instances["01"].public_key,
            key(4),
            "tie on time broken by the higher origin"
        );
    }
    // A stale write is ignored and reports no change.
    let mut s = Store::default();
    assert!(s.merge_instance(newer.clone()));
    assert!(!s.merge_instance(older));
    assert_eq!(s.instances["01"].public_key, key(2));
}

/// A handshake report (max-merged) never undoes a newer registration, and vice versa.
#[test]
fn liveness_merges_independently_of_the_registration() {
    let mut a = Store::default();
    a.merge_instance(inst("01", "10.0.0.2", 1, 1000, 1));
    let mut b = a.clone();
    // Node b sees a handshake; meanwhile the CVM re-registers on node a with a new key.
    b.saw_instance("01", 5000);
    a.merge_instance(inst("01", "10.0.0.2", 2, 2000, 1));
    a.merge(&b.to_wire(2));
    b.merge(&a.to_wire(1));
    for s in [&a, &b] {
        assert_eq!(s.instances["01"].public_key, key(2));
        assert_eq!(s.instances["01"].last_seen_ms, 5000);
    }
}

/// Recycling writes a tombstone that beats the old registration everywhere, but a later
/// re-registration beats the tombstone.
#[test]
fn tombstones_replicate_and_lose_to_reregistration() {
    let mut a = Store::default();
    a.merge_instance(inst("01", "10.0.0.2", 1, 1000, 1));
    let mut b = a.clone();
    let gone = a.recycle(100_000, Duration::from_secs(60), 1);
    assert_eq!(gone.len(), 1);
    assert!(a.effective_instances().is_empty());
    b.merge(&a.to_wire(1));
    assert!(b.effective_instances().is_empty(), "tombstone replicated");
    b.merge_instance(inst("01", "10.0.0.2", 1, 200_000, 2));
    a.merge(&b.to_wire(2));
    assert_eq!(
        a.effective_instances().len(),
        1,
        "re-registration after the tombstone wins"
    );
    // Recent activity keeps an instance.
    let mut c = Store::default();
    let mut r = inst("02", "10.0.0.3", 2, 1000, 1);
    r.last_seen_ms = 99_000;
    c.merge_instance(r);
    assert!(c.recycle(100_000, Duration::from_secs(60), 1).is_empty());
    // Old tombstones are purged, fresh ones kept.
    a.recycle(500_000, Duration::from_secs(60), 1);
    a.purge_tombstones(500_000 + 10_000, Duration::from_secs(60));
    assert_eq!(a.instances.len(), 1);
    a.purge_tombstones(500_000 + 120_000, Duration::from_secs(60));
    assert!(a.instances.is_empty());
}

/// Two nodes handed the same address to different instances: the older claim keeps it on every
/// node; the loser is left out until it re-registers elsewhere in the pool.
#[test]
fn address_conflicts_resolve_to_the_oldest_claim() {
    let mut n1 = Store::default();
    let mut n2 = Store::default();
    n1.merge_instance(inst("0b", "10.0.0.2", 1, 2000, 1));
    n2.merge_instance(inst("0a", "10.0.0.2", 2, 2500, 2));
    n1.merge(&n2.to_wire(2));
    n2.merge(&n1.to_wire(1));
    for s in [&n1, &n2] {
        let eff = s.effective_instances();
        assert_eq!(eff.len(), 1);
        assert_eq!(eff[0].instance_id, "0b", "claimed at 2000, before 2500");
    }
    // The loser re-registers with a fresh address: both are routed.
    n2.merge_instance(inst("0a", "10.0.0.3", 2, 3000, 2));
    n1.merge(&n2.to_wire(2));
    assert_eq!(n1.effective_instances().len(), 2);
    // Equal claim times: the smaller instance id wins, deterministically.
    let mut s = Store::default();
    s.merge_instance(inst("0d", "10.0.0.9", 4, 7000, 1));
    s.merge_instance(inst("0c", "10.0.0.9", 5, 7000, 2));
    assert_eq!(s.effective_instances()[0].instance_id, "0c");
}

#[test]
fn node_liveness_and_certs() {
    let mut s = Store::default();
    s.merge_node(node(1, 100, 1000));
    assert!(s.merge_node(node(1, 100, 5000)), "newer last_seen is a change");
    assert!(!s.merge_node(node(1, 50, 2000)), "older record and last_seen ignored");
    assert_eq!(s.nodes[&1].last_seen_ms, 5000);
    s.merge_node(node(2, 100, 1000));
    let live = s.live_nodes(10_000, Duration::from_secs(6));
    assert_eq!(live.iter().map(|n| n.id).collect::<Vec<_>>(), vec![1]);

    let cert = |pem: &str, t: u64, o: u32| CertRecord {
        domain: "app.test".into(),
        chain_pem: pem.into(),
        key_pem: "k".into(),
        updated_ms: t,
        origin: o,
    };
    assert!(s.merge_cert(cert("A", 10, 1)));
    assert!(!s.merge_cert(cert("B", 5, 2)));
    assert!(s.merge_cert(cert("C", 10, 2)));
    assert_eq!(s.certs["app.test"].chain_pem, "C");
}

/// The wire form round-trips, and malformed records are refused without touching the rest.
#[test]
fn wire_round_trip_and_validation() {
    let mut s = Store::default();
    let mut r = inst("ab01", "10.0.0.2", 1, 1000, 1);
    r.port_policy = PortPolicy {
        ports: vec![(443, true)],
        restrict_mode: true,
    };
    s.merge_instance(r.clone());
    s.merge_node(node(3, 1, 2));
    let mut wire = s.to_wire(1);
    let mut t = Store::default();
    let out = t.merge(&wire);
    assert!(out.instances && out.nodes && out.rejected.is_empty());
    assert_eq!(t.instances["ab01"], r);
    assert_eq!(t.nodes[&3], node(3, 1, 2));

    wire.instances[0].ip = "10.0.0.999".into();
    wire.instances.push(SyncInstance {
        instance_id: "not hex!".into(),
        ..wire.instances[0].clone()
    });
    wire.nodes[0].wg_public_key = "short".into();
    let mut u = Store::default();
    let out = u.merge(&wire);
    assert_eq!(out.rejected.len(), 3, "{:?}", out.rejected);
    assert!(u.instances.is_empty() && u.nodes.is_empty());
}
