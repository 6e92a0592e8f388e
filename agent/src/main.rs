fn main() -> anyhow::Result<()> {
    let mut dp = wirescope::datapath::Datapath::load(wirescope::EBPF_OBJECT)?;
    let m = dp.attach("lo", 1, agent_common::maps::IfaceConfig { flags: agent_common::maps::IfaceConfig::UNDERLAY })?;
    println!("{m:?}");
    std::process::Command::new("bash").args(["-c","echo hi > /dev/udp/127.0.0.1/9"]).status()?;
    println!("{:?}", dp.map_usage());
    Ok(())
}
