pub fn run(_cfg: crate::config::MachineConfig) -> Result<i32, crate::VmmError> { todo!() }
