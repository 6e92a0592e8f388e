//! What the agent measures actively rather than by watching packets: ICMP echo probes
//! ([`icmp`]), the path-MTU search ([`pmtu`]; through the tunnel where the relay cannot be
//! probed: [`carrier`]), and failover ([`failover`]), which judges the paths on what the
//! probes and the datapath saw and runs the operator's action.

pub mod carrier;
pub mod failover;
pub mod icmp;
pub mod pmtu;
