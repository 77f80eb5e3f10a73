//! Compute kernels for edgelm: the ISA chosen once at start, a persistent thread pool, and the
//! matrix products every `Linear` calls. Model code never sees SIMD, threads or `unsafe`.

mod activation;
mod attention;
mod compute;
mod flash;
pub mod interleave;
mod isa;
mod kv_quant;
mod pool;
pub mod qdot;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use activation::Activation;
pub use attention::{
    hadamard_rotate, merge_partials, BlockQ4_0, BlockQ8_0, KvBlocks, KvPlane, KV_BLOCK,
};
pub use compute::{
    ActivationPrecision, Compute, KernelError, Layout, Precision, Product, Weight, MAX_GROUP,
};
pub use flash::QueryBlock;
pub use isa::{Isa, IsaError};
pub use kv_quant::fit_symmetric;
pub use pool::ThreadPool;
#[cfg(test)]
mod test_rng;

/// Physical cores (hyper-threads share a core's FMA units, so more threads than cores rarely
/// helps); falls back to the logical count where the topology is unknown.
pub fn physical_cores() -> usize {
    let logical = std::thread::available_parallelism().map_or(1, |n| n.get());
    let Ok(info) = std::fs::read_to_string("/proc/cpuinfo") else {
        return logical;
    };
    let mut cores = std::collections::HashSet::new();
    let mut physical = "";
    for line in info.lines() {
        let mut kv = line.splitn(2, ':').map(str::trim);
        match (kv.next(), kv.next()) {
            (Some("physical id"), Some(v)) => physical = v,
            (Some("core id"), Some(v)) => {
                cores.insert((physical.to_owned(), v.to_owned()));
            }
            _ => {}
        }
    }
    if cores.is_empty() {
        logical
    } else {
        cores.len().min(logical)
    }
}
