//! (Being written: see the module docs of `bench`.)

use anyhow::{Result, bail};

use super::{Ctx, Figure};

pub fn run(_ctx: &Ctx) -> Result<Vec<Figure>> {
    bail!("not written yet")
}
