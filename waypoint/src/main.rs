//! `waypoint` binary. Configuration over Delta ADS is not wired yet (see the crate docs); this
//! entry point only validates flags and reports that.

fn main() -> anyhow::Result<()> {
    anyhow::bail!(
        "the standalone waypoint binary is not wired to the control plane yet; embed `waypoint::Waypoint` (see waypoint/tests) until xDS support lands"
    )
}
