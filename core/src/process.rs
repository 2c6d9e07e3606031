//! Process-wide tuning shared by the proxy binaries.

use std::time::Duration;

/// Tune glibc malloc for a proxy's data path. The copy loop hands out read buffers of up to
/// 256 KiB; with glibc's defaults those are mmap'ed or trimmed back to the kernel after every
/// burst and faulted in again on the next one (measured at 5–15 % of a ztunnel's CPU under
/// load). Keep them in the heap and only return free heap beyond 32 MiB on `free`; what a
/// finished burst leaves behind is returned by [`trim_free_memory_every`] instead.
///
/// One arena: glibc gives each thread that contends for an arena its own, and `malloc_trim`
/// never shrinks the top chunk of those secondary arenas (only `free` does, beyond the trim
/// threshold above). With the tokio workers each on an arena, ~10 MB of free heap stayed
/// resident after a bulk transfer while under 1 MB was in use (`malloc_stats`). The data path
/// allocates little per request and small blocks come from the per-thread tcache, so sharing
/// the main arena costs no measurable CPU.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only sets malloc parameters; binaries call this at start, before other
    // threads allocate.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// Give free heap pages back to the kernel now (glibc `malloc_trim`, all arenas). Cheap when
/// there is little to give back: it walks the free lists and `madvise`s whole free pages.
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim is thread-safe (it takes each arena's lock) and only releases pages
    // of free chunks.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Return free heap to the kernel every `every`, forever. With the high trim threshold set by
/// [`tune_allocator`], memory freed after a burst (bulk-transfer buffers, start-up parsing)
/// would otherwise stay resident for the process's life; trimming on a timer keeps bursts free
/// of page-fault churn while idle memory goes back within `every`.
pub async fn trim_free_memory_every(every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        release_free_memory();
    }
}
