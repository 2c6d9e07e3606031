//! Process-wide tuning shared by the proxy binaries.

/// Tune glibc malloc for a proxy's data path. The copy loop hands out read buffers of up to
/// 256 KiB; with glibc's defaults those are mmap'ed or trimmed back to the kernel after every
/// burst and faulted in again on the next one (measured at 5–15 % of a ztunnel's CPU under
/// load). Keep them in the heap and only return free heap beyond 32 MiB.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc parameters; binaries call this at start, before other
    // threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
    }
}
