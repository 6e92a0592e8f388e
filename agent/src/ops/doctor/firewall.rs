//! Firewall: whether a kill switch drops traffic leaving outside the tunnel (nftables or
//! iptables), and rules that drop WireGuard's own UDP ports.

use std::{
    collections::BTreeSet,
    fmt::Write as _,
    net::SocketAddr,
    process::{Command, Stdio},
};

use serde_json::Value;

use super::{Finding, Host};
use crate::sources::netlink::Netlink;

/// The table the kill-switch fix creates.
pub const KILLSWITCH_TABLE: &str = "wirescope_killswitch";

/// A rule that drops WireGuard's UDP port.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockingRule {
    pub family: String,
    pub table: String,
    pub chain: String,
    pub handle: u64,
    pub port: u16,
}

/// What `nft -j list ruleset` says about the firewall.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NftFacts {
    /// "TABLE/CHAIN" of an output chain that drops traffic outside the tunnel (policy drop,
    /// or a drop/reject rule on `oifname !=`).
    pub kill_switch: Vec<String>,
    /// Drop/reject rules matching a UDP port in `ports`.
    pub blocking: Vec<BlockingRule>,
}

fn is_drop(v: &Value) -> bool {
    v.get("drop").is_some() || v.get("reject").is_some()
}

fn numbers(v: &Value) -> Vec<u64> {
    match v {
        Value::Number(n) => n.as_u64().into_iter().collect(),
        Value::Object(o) => o
            .get("set")
            .map(numbers)
            .or_else(|| {
                o.get("range").and_then(|r| {
                    let a = r.get(0)?.as_u64()?;
                    let b = r.get(1)?.as_u64()?;
                    Some((a..=b.min(a + 65535)).collect())
                })
            })
            .unwrap_or_default(),
        Value::Array(a) => a.iter().flat_map(numbers).collect(),
        _ => Vec::new(),
    }
}

/// Reads `nft -j list ruleset`; `ports` are the WireGuard ports (listen ports and peers'
/// endpoint ports).
pub fn parse_nft(json: &str, ports: &BTreeSet<u16>) -> Result<NftFacts, String> {
    let v: Value = serde_json::from_str(json).map_err(|e| format!("nft JSON: {e}"))?;
    let items = v
        .get("nftables")
        .and_then(Value::as_array)
        .ok_or("nft JSON without an nftables array")?;
    let mut facts = NftFacts::default();
    // (family, table, chain) of base chains hooked at output.
    let mut output_chains = Vec::new();
    for it in items {
        let Some(c) = it.get("chain") else { continue };
        let s = |k: &str| c.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        if s("hook") == "output" {
            output_chains.push((s("family"), s("table"), s("name")));
            if s("policy") == "drop" {
                facts
                    .kill_switch
                    .push(format!("{}/{}", s("table"), s("name")));
            }
        }
    }
    for it in items {
        let Some(r) = it.get("rule") else { continue };
        let s = |k: &str| r.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let exprs = r
            .get("expr")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        if !exprs.iter().any(is_drop) {
            continue;
        }
        let key = (s("family"), s("table"), s("chain"));
        let matches: Vec<&Value> = exprs.iter().filter_map(|e| e.get("match")).collect();
        if output_chains.contains(&key)
            && matches.iter().any(|m| {
                m.get("op").and_then(Value::as_str) == Some("!=")
                    && m.pointer("/left/meta/key").and_then(Value::as_str) == Some("oifname")
            })
        {
            facts.kill_switch.push(format!("{}/{}", key.1, key.2));
        }
        for m in &matches {
            let Some(payload) = m.pointer("/left/payload") else {
                continue;
            };
            let proto = payload.get("protocol").and_then(Value::as_str);
            let field = payload.get("field").and_then(Value::as_str);
            let op = m.get("op").and_then(Value::as_str).unwrap_or("==");
            if proto != Some("udp")
                || !matches!(field, Some("dport" | "sport"))
                || op != "==" && op != "in"
            {
                continue;
            }
            let hit = m
                .get("right")
                .map(numbers)
                .unwrap_or_default()
                .into_iter()
                .find_map(|p| u16::try_from(p).ok().filter(|p| ports.contains(p)));
            if let (Some(port), Some(handle)) = (hit, r.get("handle").and_then(Value::as_u64)) {
                facts.blocking.push(BlockingRule {
                    family: key.0.clone(),
                    table: key.1.clone(),
                    chain: key.2.clone(),
                    handle,
                    port,
                });
            }
        }
    }
    facts.kill_switch.dedup();
    Ok(facts)
}

/// Whether `iptables -S OUTPUT` (or ip6tables) shows a kill switch: policy DROP, or a DROP
/// or REJECT rule for traffic not leaving through an interface (`! -o IFACE`).
pub fn iptables_kill_switch(rules: &str) -> bool {
    rules.lines().any(|l| {
        let l = l.trim();
        l == "-P OUTPUT DROP"
            || (l.starts_with("-A OUTPUT")
                && l.contains("! -o ")
                && (l.ends_with("-j DROP") || l.contains("-j REJECT")))
    })
}

fn output_of(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The nft command that installs a kill switch: output dropped except on loopback, the
/// tunnels and to the peers' endpoints.
pub fn killswitch_command(tunnels: &[String], endpoints: &[SocketAddr]) -> String {
    let t = KILLSWITCH_TABLE;
    let mut s = format!(
        "nft 'add table inet {t}; add chain inet {t} output {{ type filter hook output priority 0; policy drop; }}; add rule inet {t} output oifname \"lo\" accept"
    );
    for tun in tunnels {
        let _ = write!(s, "; add rule inet {t} output oifname \"{tun}\" accept");
    }
    for ep in endpoints {
        let fam = if ep.is_ipv4() { "ip" } else { "ip6" };
        let _ = write!(
            s,
            "; add rule inet {t} output {fam} daddr {} udp dport {} accept",
            ep.ip(),
            ep.port()
        );
    }
    s.push('\'');
    s
}

pub(super) async fn check_firewall(f: &mut Vec<Finding>, host: &Host) {
    let tunnels: Vec<String> = host.devices.iter().map(|(d, _)| d.name.clone()).collect();
    let mut all: Vec<SocketAddr> = host
        .devices
        .iter()
        .flat_map(|(d, _)| d.peers.iter().filter_map(|p| p.endpoint))
        .collect();
    all.sort();
    all.dedup();
    let mut ports: BTreeSet<u16> = all.iter().map(SocketAddr::port).collect();
    // Endpoints reached through a tunnel (multihop exit) need no exception in a kill switch.
    let tunnel_idx: Vec<u32> = host
        .links
        .iter()
        .filter(|l| tunnels.contains(&l.name))
        .map(|l| l.index)
        .collect();
    let nl = Netlink::new().ok();
    let mut endpoints = Vec::new();
    for ep in all {
        let oif = match &nl {
            Some(nl) => nl.route_oif(ep.ip()).await.ok().flatten(),
            None => None,
        };
        if !oif.is_some_and(|i| tunnel_idx.contains(&i)) {
            endpoints.push(ep);
        }
    }
    ports.extend(
        host.devices
            .iter()
            .map(|(d, _)| d.listen_port)
            .filter(|p| *p != 0),
    );

    let nft = output_of("nft", &["-j", "list", "ruleset"]);
    let facts = match nft.as_deref().map(|j| parse_nft(j, &ports)) {
        Some(Ok(facts)) => Some(facts),
        Some(Err(e)) => {
            f.push(Finding::info(
                "firewall",
                format!("nft ruleset unreadable: {e}"),
            ));
            None
        }
        None => None,
    };
    let ipt = ["iptables", "ip6tables"]
        .iter()
        .filter_map(|p| output_of(p, &["-S", "OUTPUT"]))
        .any(|s| iptables_kill_switch(&s));
    if nft.is_none() && !ipt {
        f.push(Finding::info(
            "firewall",
            "neither `nft list ruleset` nor `iptables -S` could be read (not root, or not \
             installed)",
        ));
    }

    for b in facts.iter().flat_map(|x| x.blocking.iter()) {
        f.push(Finding::problem(
            "firewall",
            format!(
                "nftables rule {} {}/{} handle {} drops UDP port {}, which WireGuard uses: \
                 handshakes get no response",
                b.family, b.table, b.chain, b.handle, b.port
            ),
            format!(
                "nft delete rule {} {} {} handle {}",
                b.family, b.table, b.chain, b.handle
            ),
        ));
    }

    let leaks = host
        .metrics
        .as_ref()
        .map(|m| m.sum("wirescope_leaked_packets_total", &[]));
    let switch: Vec<String> = facts.map(|x| x.kill_switch).unwrap_or_default();
    let has_switch = !switch.is_empty() || ipt;
    if tunnels.is_empty() {
        return;
    }
    let fix = killswitch_command(&tunnels, &endpoints);
    if has_switch {
        let whr = if switch.is_empty() {
            "iptables OUTPUT".to_string()
        } else {
            format!("nftables {}", switch.join(", "))
        };
        f.push(Finding::ok(
            "kill_switch",
            format!("traffic outside the tunnel is dropped ({whr})"),
        ));
        if let Some(n) = leaks.filter(|n| *n > 0.0) {
            f.push(Finding::info(
                "kill_switch",
                format!(
                    "the agent counted {n} packets leaving outside the tunnel \
                     (wirescope_leaked_packets_total, counted before the firewall or before it \
                     was set up)"
                ),
            ));
        }
    } else {
        let leak = match leaks {
            Some(n) if n > 0.0 => format!("; the agent counted {n} leaked packets"),
            Some(_) => "; the agent counted no leak so far".to_string(),
            None => String::new(),
        };
        f.push(Finding::problem(
            "kill_switch",
            format!(
                "no kill switch: no firewall rule drops traffic leaving outside {}{leak}",
                tunnels.join(", ")
            ),
            fix,
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NFT: &str = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
 {"table": {"family": "inet", "name": "f", "handle": 1}},
 {"chain": {"family": "inet", "table": "f", "name": "out", "handle": 1, "type": "filter", "hook": "output", "prio": 0, "policy": "accept"}},
 {"chain": {"family": "inet", "table": "f", "name": "in", "handle": 2, "type": "filter", "hook": "input", "prio": 0, "policy": "accept"}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 4, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "in", "handle": 5, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "sport"}}, "right": {"set": [53, 51821]}}}, {"reject": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 6, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 9999}}, {"drop": null}]}},
 {"rule": {"family": "inet", "table": "f", "chain": "out", "handle": 7, "expr": [{"match": {"op": "==", "left": {"payload": {"protocol": "udp", "field": "dport"}}, "right": 51820}}, {"accept": null}]}}
]}"#;

    #[test]
    fn nft_blocking_rules() {
        let ports: BTreeSet<u16> = [51820, 51821].into();
        let f = parse_nft(NFT, &ports).unwrap();
        assert!(f.kill_switch.is_empty());
        assert_eq!(
            f.blocking
                .iter()
                .map(|b| (b.chain.as_str(), b.handle, b.port))
                .collect::<Vec<_>>(),
            vec![("out", 4, 51820), ("in", 5, 51821)]
        );
        assert!(parse_nft("{}", &ports).is_err());
        assert!(parse_nft("not json", &ports).is_err());
    }

    #[test]
    fn nft_kill_switch() {
        let policy = r#"{"nftables": [{"chain": {"family": "inet", "table": "mullvad", "name": "output", "hook": "output", "policy": "drop"}}]}"#;
        assert_eq!(
            parse_nft(policy, &BTreeSet::new()).unwrap().kill_switch,
            vec!["mullvad/output"]
        );
        let rule = r#"{"nftables": [{"chain": {"family": "inet", "table": "t", "name": "o", "hook": "output", "policy": "accept"}},
          {"rule": {"family": "inet", "table": "t", "chain": "o", "handle": 3, "expr": [{"match": {"op": "!=", "left": {"meta": {"key": "oifname"}}, "right": "wg0"}}, {"reject": {"type": "icmpx"}}]}}]}"#;
        assert_eq!(
            parse_nft(rule, &BTreeSet::new()).unwrap().kill_switch,
            vec!["t/o"]
        );
        // The same rule in an input chain is no kill switch.
        let input = rule.replace("\"output\"", "\"input\"");
        assert!(
            parse_nft(&input, &BTreeSet::new())
                .unwrap()
                .kill_switch
                .is_empty()
        );
    }

    #[test]
    fn iptables() {
        assert!(iptables_kill_switch("-P INPUT ACCEPT\n-P OUTPUT DROP\n"));
        assert!(iptables_kill_switch(
            "-P OUTPUT ACCEPT\n-A OUTPUT ! -o wg0 -m mark ! --mark 0xca6c -j REJECT --reject-with icmp-port-unreachable\n"
        ));
        assert!(!iptables_kill_switch(
            "-P OUTPUT ACCEPT\n-A OUTPUT -o wg0 -j DROP\n"
        ));
        assert!(!iptables_kill_switch(""));
    }

    #[test]
    fn killswitch_fix() {
        let c = killswitch_command(&["wg0".into()], &["192.0.2.1:51820".parse().unwrap()]);
        assert!(
            c.starts_with("nft 'add table inet wirescope_killswitch;"),
            "{c}"
        );
        assert!(c.contains("policy drop;"));
        assert!(c.contains("oifname \"wg0\" accept"));
        assert!(
            c.ends_with("ip daddr 192.0.2.1 udp dport 51820 accept'"),
            "{c}"
        );
    }
}
