pub fn demo(_keep: bool, _down: bool) -> anyhow::Result<()> {
    anyhow::bail!("not yet")
}
