//! Resource names: opaque bytes (at most 64, checked by the server), with a GFS-style
//! constructor so file systems name their inodes, resource groups and journals the way
//! lock_gulm did.

use std::fmt;

/// The name of a lockable resource inside a lockspace: up to 64 arbitrary bytes.
///
/// The server validates the length; the client sends the bytes unchanged.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Resource(Vec<u8>);

impl Resource {
    /// The length of a name made by [`Resource::gfs`].
    pub const GFS_NAME_LEN_BYTES: usize = 12;

    /// A GFS-style name: the lock type as 4 big-endian bytes followed by the 64-bit lock
    /// number as 8 big-endian bytes (12 bytes in all).
    ///
    /// Big-endian keeps the byte order equal to the numeric order, so names of one type
    /// sort by number. Example: type 2 (inode), number 0x1234 gives
    /// `00 00 00 02 00 00 00 00 00 00 12 34`.
    pub fn gfs(lock_type: u32, number: u64) -> Resource {
        let mut name = Vec::with_capacity(Self::GFS_NAME_LEN_BYTES);
        name.extend_from_slice(&lock_type.to_be_bytes());
        name.extend_from_slice(&number.to_be_bytes());
        Resource(name)
    }

    /// The name's bytes as sent on the wire.
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    /// The name's bytes, by value.
    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

impl From<&str> for Resource {
    fn from(name: &str) -> Resource {
        Resource(name.as_bytes().to_vec())
    }
}

impl From<String> for Resource {
    fn from(name: String) -> Resource {
        Resource(name.into_bytes())
    }
}

impl From<&[u8]> for Resource {
    fn from(name: &[u8]) -> Resource {
        Resource(name.to_vec())
    }
}

impl From<Vec<u8>> for Resource {
    fn from(name: Vec<u8>) -> Resource {
        Resource(name)
    }
}

impl From<&Resource> for Resource {
    fn from(name: &Resource) -> Resource {
        name.clone()
    }
}

impl AsRef<[u8]> for Resource {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Printable ASCII names print as text; anything else as `0x` and lower-case hex.
impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let printable =
            !self.0.is_empty() && self.0.iter().all(|b| b.is_ascii_graphic() || *b == b' ');
        if printable {
            // Safe: every byte is ASCII.
            f.write_str(&String::from_utf8_lossy(&self.0))
        } else {
            f.write_str("0x")?;
            for b in &self.0 {
                write!(f, "{b:02x}")?;
            }
            Ok(())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gfs_name_is_be_type_then_be_number() {
        let r = Resource::gfs(2, 0x0102_0304_0506_0708);
        assert_eq!(
            r.as_bytes(),
            &[0, 0, 0, 2, 1, 2, 3, 4, 5, 6, 7, 8][..],
            "4-byte BE type, 8-byte BE number"
        );
        assert_eq!(r.as_bytes().len(), Resource::GFS_NAME_LEN_BYTES);
    }

    #[test]
    fn gfs_names_of_one_type_sort_by_number() {
        assert!(Resource::gfs(2, 255) < Resource::gfs(2, 256));
        assert!(Resource::gfs(1, u64::MAX) < Resource::gfs(2, 0));
    }

    #[test]
    fn conversions_keep_the_bytes() {
        assert_eq!(Resource::from("inode-7").as_bytes(), b"inode-7");
        assert_eq!(Resource::from(String::from("x")).as_bytes(), b"x");
        assert_eq!(Resource::from(&b"\x00\x01"[..]).as_bytes(), b"\x00\x01");
        assert_eq!(Resource::from(vec![9u8, 8]).into_bytes(), vec![9, 8]);
    }

    #[test]
    fn display_is_text_or_hex() {
        assert_eq!(Resource::from("journal 3").to_string(), "journal 3");
        assert_eq!(
            Resource::gfs(1, 2).to_string(),
            "0x000000010000000000000002"
        );
        assert_eq!(Resource::from("").to_string(), "0x");
    }
}
