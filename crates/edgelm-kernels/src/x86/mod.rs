pub mod avx2;
