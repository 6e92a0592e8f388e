//! Unit tests of the throughput bench's pure parts: iperf3's JSON read into a sample, and
//! the cases' goals.

use super::iperf::parse_sample;
use super::*;

#[test]
fn udp_sample_is_received_packets_per_second() {
    let v: serde_json::Value = serde_json::from_str(
        r#"{"end":{"sum_sent":{"seconds":2.0,"packets":1000},
                   "sum_received":{"seconds":2.0,"packets":1000,"lost_packets":100}}}"#,
    )
    .unwrap();
    let s = parse_sample(&v, Proto::Udp).unwrap();
    assert_eq!(s.value, 450.0);
    assert_eq!(s.sent_pps, 500.0);
    assert!((s.loss_pct - 10.0).abs() < 1e-9);
    assert!(parse_sample(&serde_json::json!({"end": {}}), Proto::Udp).is_err());
}

#[test]
fn goals_only_on_udp() {
    let goals: Vec<Option<Goal>> = CASES.iter().map(|c| c.goal()).collect();
    assert_eq!(
        goals,
        [
            None,
            Some(Goal::AtLeast(97.0)),
            None,
            Some(Goal::AtLeast(99.0))
        ]
    );
}
