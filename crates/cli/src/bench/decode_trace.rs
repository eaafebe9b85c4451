//! `bench decode --trace`: where one decode attention launch's time goes, from the
//! stamps of the traced kernel (`AttentionBatch::enable_trace`).

/// Where the last traced launch's time went (`AttentionBatch::enable_trace`): per phase,
/// the median and largest time over blocks, from each block's SM cycle counter at
/// `clock_mhz`; block entries and exits from the global timer.
pub(super) fn print_trace(label: &str, stamps: &[u64], clock_mhz: u32) {
    use radix_kernels::attention::TRACE_SLOTS;
    let blocks: Vec<&[u64]> =
        stamps.chunks(TRACE_SLOTS).filter(|b| b[8] != 0 && b[9] >= b[8]).collect();
    if blocks.is_empty() {
        println!("{label} trace: no block stamped");
        return;
    }
    let us = |cycles: u64| cycles as f64 / clock_mhz.max(1) as f64;
    let stats = |mut v: Vec<f64>| -> String {
        if v.is_empty() {
            return "-".into();
        }
        v.sort_by(f64::total_cmp);
        format!("{:.2} / {:.2}", v[v.len() / 2], v[v.len() - 1])
    };
    let start = blocks.iter().map(|b| b[8]).min().unwrap_or(0);
    let end = blocks.iter().map(|b| b[9]).max().unwrap_or(0);
    println!(
        "{label} trace ({} blocks, us, median / max over blocks): launch {:.2} (first entry to \
         last exit); entries after the first {}; lifetimes {}",
        blocks.len(),
        (end - start) as f64 / 1e3,
        stats(blocks.iter().map(|b| (b[8] - start) as f64 / 1e3).collect()),
        stats(blocks.iter().map(|b| (b[9] - b[8]) as f64 / 1e3).collect()),
    );
    let phases = [
        (1, "plan read"),
        (2, "wait for the kernel before"),
        (3, "first tile in"),
        (4, "tiles"),
        (5, "epilogue written"),
        (6, "split counted"),
    ];
    let mut line = String::new();
    for (i, name) in phases {
        let v: Vec<f64> = blocks
            .iter()
            .filter(|b| b[i] >= b[i - 1] && b[i - 1] != 0)
            .map(|b| us(b[i] - b[i - 1]))
            .collect();
        line += &format!("; {name} {}", stats(v));
    }
    // The key-split epilogue's steps: states to shared memory, the barrier, the combine.
    for (a, b, name) in [(4, 11, "states stored"), (11, 12, "barrier"), (12, 13, "combined")] {
        let v: Vec<f64> = blocks
            .iter()
            .filter(|s| s[b] >= s[a] && s[a] != 0 && s[b] != 0)
            .map(|s| us(s[b] - s[a]))
            .collect();
        line += &format!("; ({name} {})", stats(v));
    }
    let merges: Vec<f64> = blocks.iter().filter(|b| b[7] > b[6]).map(|b| us(b[7] - b[6])).collect();
    println!(
        "{label} trace phases{line}; merge {} ({} merging blocks)",
        stats(merges.clone()),
        merges.len()
    );
}
