fn main() -> anyhow::Result<()> {
    anyhow::bail!("xtask: not written yet")
}
