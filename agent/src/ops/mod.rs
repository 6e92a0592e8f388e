//! The operator's commands, clients of a running agent: `wirescope status` ([`status`]),
//! which renders the agent's status document, and `wirescope doctor` ([`doctor`]), which
//! checks the host and asks the agent for what only it measures. Both reach the agent
//! through [`client`] (HTTP or HTTPS, basic auth).

pub mod client;
pub mod doctor;
pub mod status;
