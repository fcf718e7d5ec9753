//! Reading lines: what every line source shares.

use std::io::BufRead;

/// `BufRead::read_until(b'\n', line)`, searching with the memchr crate's
/// vectorised `memchr` (std's looks at a word at a time: 4% of the
/// decoding thread's instructions on retail lines).
pub fn read_line<R: BufRead + ?Sized>(input: &mut R, line: &mut Vec<u8>) -> std::io::Result<usize> {
    let mut read = 0;
    loop {
        let available = match input.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let (done, used) = match memchr::memchr(b'\n', available) {
            Some(i) => (true, i + 1),
            None => (available.is_empty(), available.len()),
        };
        line.extend_from_slice(&available[..used]);
        input.consume(used);
        read += used;
        if done {
            return Ok(read);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::read_line;
    use proptest::prelude::*;
    use std::io::{BufRead, BufReader};

    proptest! {
        /// Whatever the bytes and however the buffer splits them, `read_line`
        /// reads the same lines, and counts, as `read_until`.
        #[test]
        fn reads_as_read_until(bytes in proptest::collection::vec(prop_oneof![Just(b'\n'), Just(b'x'), any::<u8>()], 0..300), capacity in 1usize..40) {
            let (mut ours, mut theirs) = (BufReader::with_capacity(capacity, &bytes[..]), BufReader::with_capacity(capacity, &bytes[..]));
            loop {
                let (mut a, mut b) = (Vec::new(), Vec::new());
                let (n, m) = (read_line(&mut ours, &mut a).unwrap(), theirs.read_until(b'\n', &mut b).unwrap());
                prop_assert_eq!((n, &a), (m, &b));
                if n == 0 {
                    break;
                }
            }
        }
    }
}
