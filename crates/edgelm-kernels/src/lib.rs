//! Compute kernels for edgelm: the ISA chosen once at start, a persistent thread pool, and the
//! matrix products every `Linear` calls. Model code never sees SIMD, threads or `unsafe`.

mod compute;
mod isa;
mod pool;
#[cfg(target_arch = "x86_64")]
mod x86;

pub use compute::{Compute, KernelError, Weight};
pub use isa::{Isa, IsaError};
pub use pool::ThreadPool;
