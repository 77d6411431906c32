//! A compact bit set over piece indices (64 per word), with the few operations the
//! simulator needs fast: first missing, count, "set here and not there".

#[derive(Clone, Debug, PartialEq, Eq, Default)]
pub struct Bits {
    words: Vec<u64>,
    len: u32,
    ones: u32,
}

impl Bits {
    pub fn new(len: u32) -> Bits {
        Bits { words: vec![0; (len as usize).div_ceil(64)], len, ones: 0 }
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len && !self.get(i) {
            self.words[(i / 64) as usize] |= 1 << (i % 64);
            self.ones += 1;
        }
    }

    pub fn unset(&mut self, i: u32) {
        if self.get(i) {
            self.words[(i / 64) as usize] &= !(1 << (i % 64));
            self.ones -= 1;
        }
    }

    #[cfg(test)]
    pub fn count(&self) -> u32 {
        self.ones
    }

    pub fn is_full(&self) -> bool {
        self.ones == self.len
    }

    #[cfg(test)]
    pub fn fill(&mut self) {
        for i in 0..self.len {
            self.set(i);
        }
    }

    pub fn first_missing(&self) -> u32 {
        for (w, word) in self.words.iter().enumerate() {
            if *word != u64::MAX {
                return ((w as u32) * 64 + (!word).trailing_zeros()).min(self.len);
            }
        }
        self.len
    }

    pub fn copy_from(&mut self, other: &Bits) {
        self.words.copy_from_slice(&other.words);
        self.ones = other.ones;
    }

    /// Indices set here and not in `other`.
    pub fn diff_ones<'a>(&'a self, other: &'a Bits) -> impl Iterator<Item = u32> + 'a {
        self.words.iter().zip(&other.words).enumerate().flat_map(|(w, (a, b))| {
            let mut x = a & !b;
            std::iter::from_fn(move || {
                if x == 0 {
                    return None;
                }
                let t = x.trailing_zeros();
                x &= x - 1;
                Some(w as u32 * 64 + t)
            })
        })
    }

    pub fn ones(&self) -> impl Iterator<Item = u32> + '_ {
        self.words.iter().enumerate().flat_map(|(w, a)| {
            let mut x = *a;
            std::iter::from_fn(move || {
                if x == 0 {
                    return None;
                }
                let t = x.trailing_zeros();
                x &= x - 1;
                Some(w as u32 * 64 + t)
            })
        })
    }

    /// The wire form: one bit per piece, LSB first in each byte.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        out.truncate((self.len as usize).div_ceil(8));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = Bits::new(130);
        b.set(0);
        b.set(129);
        b.set(129);
        assert_eq!((b.count(), b.first_missing()), (2, 1));
        let bytes = b.to_bytes();
        assert_eq!(bytes.len(), 17);
        assert_eq!((bytes[0], bytes[16]), (1, 2));
        let mut c = Bits::new(130);
        c.set(0);
        assert_eq!(b.diff_ones(&c).collect::<Vec<_>>(), vec![129]);
        c.fill();
        assert!(c.is_full());
        assert_eq!(c.first_missing(), 130);
        assert_eq!(b.ones().collect::<Vec<_>>(), vec![0, 129]);
    }
}
