//! What an image check reports and repairs, for every format that
//! checks (`qemu-img check`): the request and QEMU's `BdrvCheckResult`
//! counters. The checks themselves live with their formats.

/// What a check repairs (`-r`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Repair {
    /// Report only.
    None,
    /// Leaks (space wasted, data safe).
    Leaks,
    /// Leaks and corruptions.
    All,
}

/// A check's outcome, with qemu-img's counters (QEMU's `BdrvCheckResult`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckResult {
    /// Corruptions found.
    pub corruptions: u64,
    /// Leaked clusters found.
    pub leaks: u64,
    /// Corruptions repaired.
    pub corruptions_fixed: u64,
    /// Leaks repaired.
    pub leaks_fixed: u64,
    /// Errors that kept the check from finishing.
    pub check_errors: u64,
    /// End of the last used cluster (0: unknown).
    pub image_end_offset: u64,
    /// Guest clusters.
    pub total_clusters: u64,
    /// Allocated guest clusters.
    pub allocated_clusters: u64,
    /// Fragmented guest clusters.
    pub fragmented_clusters: u64,
    /// Compressed guest clusters.
    pub compressed_clusters: u64,
    /// One line per problem found, for stderr.
    pub messages: Vec<String>,
}

impl CheckResult {
    /// Corruptions left after repair.
    pub fn corruptions_after(&self) -> u64 {
        self.corruptions.saturating_sub(self.corruptions_fixed)
    }
    /// Leaks left after repair.
    pub fn leaks_after(&self) -> u64 {
        self.leaks.saturating_sub(self.leaks_fixed)
    }
}
