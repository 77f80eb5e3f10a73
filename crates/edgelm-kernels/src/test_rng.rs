//! The xorshift64* generator every kernel test draws random blocks from.

pub struct Rng(pub u64);

impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// Uniform in [-1, 1).
    pub fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }

    /// 10^[-e, e).
    pub fn magnitude(&mut self, e: f32) -> f32 {
        10f32.powf(e * self.unit())
    }

    /// A finite f16 with random sign and mantissa and a biased exponent in `exponents`, as bytes.
    pub fn f16_bytes(&mut self, exponents: std::ops::RangeInclusive<u16>) -> [u8; 2] {
        let sign = (self.below(2) as u16) << 15;
        let span = (exponents.end() - exponents.start() + 1) as u64;
        let exp = exponents.start() + self.below(span) as u16;
        (sign | (exp << 10) | self.below(1024) as u16).to_le_bytes()
    }

    /// A finite f16 of magnitude in [2^-10, 2^2): a plausible block scale.
    pub fn small_f16(&mut self) -> [u8; 2] {
        self.f16_bytes(5..=16)
    }

    /// Roughly bell-shaped values with an occasional outlier.
    pub fn weight(&mut self) -> f32 {
        let v = (self.unit() + self.unit() + self.unit()) * 0.5;
        if self.below(64) == 0 {
            v * 8.0
        } else {
            v
        }
    }
}
