//! Token sampling: penalties, then top-k, top-p and min-p (on untempered probabilities), then
//! temperature, then a draw from a seeded generator — llama.cpp's default order.

/// Sampling settings. `temperature <= 0` is greedy (argmax after penalties).
#[derive(Debug, Clone)]
pub struct SamplingParams {
    pub temperature: f32,
    /// 0 disables.
    pub top_k: usize,
    /// 1.0 disables.
    pub top_p: f32,
    /// 0.0 disables.
    pub min_p: f32,
    /// 1.0 disables.
    pub repeat_penalty: f32,
    pub frequency_penalty: f32,
    pub presence_penalty: f32,
    /// How many recent tokens the penalties look at.
    pub penalty_last_n: usize,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 40,
            top_p: 0.95,
            min_p: 0.05,
            repeat_penalty: 1.0,
            frequency_penalty: 0.0,
            presence_penalty: 0.0,
            penalty_last_n: 64,
            seed: 0,
        }
    }
}

/// xoshiro256** seeded through SplitMix64: small, fast, and the same stream on every platform.
#[derive(Debug, Clone)]
pub struct Rng([u64; 4]);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        let mut z = seed;
        let mut next = || {
            z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut x = z;
            x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            x ^ (x >> 31)
        };
        Rng([next(), next(), next(), next()])
    }

    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.0;
        let out = s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        out
    }

    /// Uniform in [0, 1).
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A candidate token with its (possibly adjusted) logit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Candidate {
    pub id: u32,
    pub logit: f32,
}

pub struct Sampler {
    params: SamplingParams,
    rng: Rng,
    candidates: Vec<Candidate>,
}

impl Sampler {
    pub fn new(params: SamplingParams) -> Sampler {
        let rng = Rng::new(params.seed);
        Sampler {
            params,
            rng,
            candidates: Vec::new(),
        }
    }

    pub fn params(&self) -> &SamplingParams {
        &self.params
    }

    /// Pick the next token from `logits`, given the tokens seen so far (for penalties).
    pub fn sample(&mut self, logits: &[f32], history: &[u32]) -> u32 {
        let recent = &history[history.len().saturating_sub(self.params.penalty_last_n)..];
        // Greedy without penalties needs no candidate list (a vocabulary-sized copy per token).
        if self.params.temperature <= 0.0 && !penalties_apply(recent, &self.params) {
            return first_max(logits);
        }
        let mut cands = std::mem::take(&mut self.candidates);
        cands.clear();
        cands.extend(logits.iter().enumerate().map(|(i, &l)| Candidate {
            id: i as u32,
            logit: l,
        }));
        apply_penalties(&mut cands, recent, &self.params);
        let id = if self.params.temperature <= 0.0 {
            argmax(&cands)
        } else {
            self.filter(&mut cands);
            let t = self.params.temperature;
            cands.iter_mut().for_each(|c| c.logit /= t);
            let probs = softmax(&cands);
            let r = self.rng.next_f64() * probs.iter().sum::<f64>();
            let mut acc = 0.0;
            let mut pick = cands[cands.len() - 1].id;
            for (c, p) in cands.iter().zip(&probs) {
                acc += p;
                if r < acc {
                    pick = c.id;
                    break;
                }
            }
            pick
        };
        self.candidates = cands;
        id
    }

    /// Apply top-k, top-p and min-p, leaving `cands` sorted by logit, highest first.
    pub fn filter(&self, cands: &mut Vec<Candidate>) {
        let p = &self.params;
        let by_logit = |a: &Candidate, b: &Candidate| b.logit.total_cmp(&a.logit);
        if p.top_k > 0 && p.top_k < cands.len() {
            cands.select_nth_unstable_by(p.top_k - 1, by_logit);
            cands.truncate(p.top_k);
        }
        cands.sort_by(by_logit);
        if p.top_p < 1.0 {
            let probs = softmax(cands);
            let mut cum = 0.0;
            let mut keep = cands.len();
            for (i, q) in probs.iter().enumerate() {
                cum += q;
                if cum >= p.top_p as f64 {
                    keep = i + 1;
                    break;
                }
            }
            cands.truncate(keep.max(1));
        }
        if p.min_p > 0.0 && !cands.is_empty() {
            let threshold = cands[0].logit + p.min_p.ln();
            let keep = cands.iter().take_while(|c| c.logit >= threshold).count();
            cands.truncate(keep.max(1));
        }
    }
}

/// Repetition penalty divides positive logits and multiplies negative ones of seen tokens;
/// frequency and presence penalties subtract per occurrence and once.
pub fn apply_penalties(cands: &mut [Candidate], recent: &[u32], p: &SamplingParams) {
    if !penalties_apply(recent, p) {
        return;
    }
    let mut counts: Vec<(u32, u32)> = Vec::new();
    for &t in recent {
        match counts.iter_mut().find(|(id, _)| *id == t) {
            Some(e) => e.1 += 1,
            None => counts.push((t, 1)),
        }
    }
    for &(id, n) in &counts {
        // Candidates are still indexed by id when penalties run.
        if let Some(c) = cands.get_mut(id as usize).filter(|c| c.id == id) {
            c.logit = if c.logit > 0.0 {
                c.logit / p.repeat_penalty
            } else {
                c.logit * p.repeat_penalty
            };
            c.logit -= n as f32 * p.frequency_penalty + p.presence_penalty;
        }
    }
}

fn penalties_apply(recent: &[u32], p: &SamplingParams) -> bool {
    !recent.is_empty()
        && (p.repeat_penalty != 1.0 || p.frequency_penalty != 0.0 || p.presence_penalty != 0.0)
}

/// The first index of the largest logit (as `argmax` picks among candidates in id order).
fn first_max(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &l) in logits.iter().enumerate() {
        if l > logits[best] {
            best = i;
        }
    }
    best as u32
}

fn argmax(cands: &[Candidate]) -> u32 {
    cands
        .iter()
        .fold(
            cands[0],
            |best, c| if c.logit > best.logit { *c } else { best },
        )
        .id
}

fn softmax(cands: &[Candidate]) -> Vec<f64> {
    let max = cands
        .iter()
        .map(|c| c.logit)
        .fold(f32::NEG_INFINITY, f32::max) as f64;
    let e: Vec<f64> = cands.iter().map(|c| (c.logit as f64 - max).exp()).collect();
    let s: f64 = e.iter().sum();
    e.into_iter().map(|x| x / s).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_shortcut_picks_what_the_candidate_path_picks() {
        let mut rng = Rng::new(3);
        for n in [1, 2, 7, 1000] {
            // Coarse values, so ties happen: both paths keep the first.
            let logits: Vec<f32> = (0..n).map(|_| (rng.next_u64() % 5) as f32).collect();
            let want = argmax(&cands(&logits));
            assert_eq!(first_max(&logits), want);
            let mut greedy = Sampler::new(SamplingParams {
                temperature: 0.0,
                ..params()
            });
            assert_eq!(greedy.sample(&logits, &[]), want);
        }
    }

    fn cands(logits: &[f32]) -> Vec<Candidate> {
        logits
            .iter()
            .enumerate()
            .map(|(i, &l)| Candidate {
                id: i as u32,
                logit: l,
            })
            .collect()
    }

    fn params() -> SamplingParams {
        SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            ..Default::default()
        }
    }

    fn ids(c: &[Candidate]) -> Vec<u32> {
        c.iter().map(|c| c.id).collect()
    }

    #[test]
    fn top_k_keeps_the_k_highest() {
        let s = Sampler::new(SamplingParams {
            top_k: 2,
            ..params()
        });
        let mut c = cands(&[0.1, 3.0, -1.0, 2.0]);
        s.filter(&mut c);
        assert_eq!(ids(&c), vec![1, 3]);
    }

    #[test]
    fn top_p_keeps_the_smallest_prefix_reaching_p() {
        // Probabilities ∝ e^l: 0.665, 0.245, 0.090 for logits 2, 1, 0.
        let s = Sampler::new(SamplingParams {
            top_p: 0.9,
            ..params()
        });
        let mut c = cands(&[0.0, 2.0, 1.0]);
        s.filter(&mut c);
        assert_eq!(ids(&c), vec![1, 2]);
        let s = Sampler::new(SamplingParams {
            top_p: 0.6,
            ..params()
        });
        let mut c = cands(&[0.0, 2.0, 1.0]);
        s.filter(&mut c);
        assert_eq!(ids(&c), vec![1]);
    }

    #[test]
    fn min_p_drops_tokens_below_fraction_of_best() {
        // p/p_max = e^(l - l_max): 1, e^-1 = 0.37, e^-3 = 0.05.
        let s = Sampler::new(SamplingParams {
            min_p: 0.1,
            ..params()
        });
        let mut c = cands(&[5.0, 4.0, 2.0]);
        s.filter(&mut c);
        assert_eq!(ids(&c), vec![0, 1]);
    }

    #[test]
    fn penalties_follow_their_definitions() {
        let p = SamplingParams {
            repeat_penalty: 2.0,
            frequency_penalty: 0.5,
            presence_penalty: 0.25,
            ..params()
        };
        let mut c = cands(&[4.0, -4.0, 1.0]);
        apply_penalties(&mut c, &[0, 1, 1], &p);
        assert_eq!(c[0].logit, 4.0 / 2.0 - 0.5 - 0.25);
        assert_eq!(c[1].logit, -4.0 * 2.0 - 1.0 - 0.25);
        assert_eq!(c[2].logit, 1.0);
    }

    #[test]
    fn greedy_is_argmax_and_penalty_can_change_it() {
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            ..params()
        });
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[]), 1);
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.0,
            repeat_penalty: 2.0,
            ..params()
        });
        assert_eq!(s.sample(&[1.0, 3.0, 2.0], &[1]), 2);
    }

    #[test]
    fn same_seed_same_draws_and_frequencies_match_probabilities() {
        let logits = [0.0f32, 1.0, 2.0];
        let draw = |seed| {
            let mut s = Sampler::new(SamplingParams { seed, ..params() });
            (0..20_000)
                .map(|_| s.sample(&logits, &[]))
                .collect::<Vec<_>>()
        };
        let a = draw(7);
        assert_eq!(a, draw(7));
        assert_ne!(a, draw(8));
        let z: f64 = logits.iter().map(|&l| (l as f64).exp()).sum();
        for (id, &l) in logits.iter().enumerate() {
            let freq = a.iter().filter(|&&t| t == id as u32).count() as f64 / a.len() as f64;
            let want = (l as f64).exp() / z;
            assert!((freq - want).abs() < 0.015, "token {id}: {freq} vs {want}");
        }
    }

    #[test]
    fn temperature_sharpens() {
        let logits = [0.0f32, 1.0];
        let mut s = Sampler::new(SamplingParams {
            temperature: 0.25,
            seed: 1,
            ..params()
        });
        let ones = (0..5000).filter(|_| s.sample(&logits, &[]) == 1).count() as f64 / 5000.0;
        // p(1) = 1 / (1 + e^-4) = 0.982.
        assert!((ones - 0.982).abs() < 0.01, "{ones}");
    }
}
