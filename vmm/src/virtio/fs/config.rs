//! `--fs TAG=DIR[,cache=MODE][,root=ROOT]`: what a shared directory is, how the guest may
//! cache it, and the root its worker is held in.
use std::path::PathBuf;

use super::{FsError, TAG_MAX};

/// How much the guest may cache of the share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CacheMode {
    /// Every access goes to the host: for trees the host changes under the guest.
    Never,
    /// Close-to-open: data cached while a file is open, metadata for a second. Containers'
    /// rootfs and volumes, which the host rarely touches while they are in use.
    #[default]
    Auto,
    /// The guest owns the tree: data and metadata cached for a day.
    Always,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "never" => Ok(CacheMode::Never),
            "auto" => Ok(CacheMode::Auto),
            "always" => Ok(CacheMode::Always),
            other => Err(format!(
                "unknown virtio-fs cache mode {other:?} (use never, auto or always)"
            )),
        }
    }
}

/// One shared directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsConfig {
    /// The name the guest mounts it by.
    pub tag: String,
    /// The host directory; only what is under it is reachable.
    pub dir: PathBuf,
    pub cache: CacheMode,
    /// A directory above `dir` that holds nothing but it and `proc/self/fd` (a bind of this
    /// process's `/proc/self/fd`, where the passthrough names files for their xattrs): the
    /// confined worker `chroot`s there, so that no host path outside the share has a name
    /// for it (the process's descriptors aside: `/proc/self/fd/N/..` from one of a
    /// directory outside still leads out; the passthrough's own is pointed inside). The shim's sandbox directories have one (`fs-root`); without it the worker is
    /// held by Landlock alone, which does not cover chmod, chown or xattrs.
    pub root: Option<PathBuf>,
}

impl std::str::FromStr for FsConfig {
    type Err = String;
    /// `TAG=DIR`, then optionally `,cache=never|auto|always` and `,root=ROOT`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (tag, rest) = s
            .split_once('=')
            .ok_or_else(|| format!("{s:?}: expected TAG=DIR[,cache=MODE][,root=ROOT]"))?;
        let (rest, root) = match rest.rsplit_once(",root=") {
            Some((_, "")) => return Err(format!("{s:?}: empty root")),
            Some((rest, root)) => (rest, Some(PathBuf::from(root))),
            None => (rest, None),
        };
        let (dir, cache) = match rest.rsplit_once(",cache=") {
            Some((dir, mode)) => (dir, mode.parse()?),
            None => (rest, CacheMode::default()),
        };
        if dir.is_empty() {
            return Err(format!("{s:?}: empty directory"));
        }
        check_tag(tag).map_err(|e| e.to_string())?;
        Ok(FsConfig {
            tag: tag.into(),
            dir: dir.into(),
            cache,
            root,
        })
    }
}

/// A tag must fit the device's config space and be something `mount` can pass.
pub fn check_tag(tag: &str) -> Result<(), FsError> {
    let reason = if tag.is_empty() {
        "empty"
    } else if tag.len() > TAG_MAX {
        "longer than 36 bytes"
    } else if tag
        .bytes()
        .any(|b| b == 0 || b == b',' || b.is_ascii_whitespace())
    {
        "contains a NUL, comma or white space"
    } else {
        return Ok(());
    };
    Err(FsError::Tag {
        tag: tag.into(),
        reason,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_tag_dir_and_cache_mode() {
        let c: FsConfig = "rootfs=/run/shoal/s1/shared".parse().unwrap();
        assert_eq!(c.tag, "rootfs");
        assert_eq!(c.dir, PathBuf::from("/run/shoal/s1/shared"));
        assert_eq!(c.cache, CacheMode::Auto);
        let c: FsConfig = "t=/a,b,cache=never".parse().unwrap();
        assert_eq!(c.dir, PathBuf::from("/a,b"));
        assert_eq!(c.cache, CacheMode::Never);
        assert_eq!(
            "t=/a,cache=always".parse::<FsConfig>().unwrap().cache,
            CacheMode::Always
        );
        let c: FsConfig = "t=/s/fs-root/share,cache=never,root=/s/fs-root"
            .parse()
            .unwrap();
        assert_eq!(
            (c.dir, c.cache, c.root),
            (
                PathBuf::from("/s/fs-root/share"),
                CacheMode::Never,
                Some(PathBuf::from("/s/fs-root"))
            )
        );
        assert_eq!("t=/a".parse::<FsConfig>().unwrap().root, None);
    }

    #[test]
    fn rejects_bad_arguments_by_name() {
        let err = |s: &str| s.parse::<FsConfig>().unwrap_err();
        assert!(err("/just/a/dir").contains("TAG=DIR"));
        assert!(err("t=").contains("empty directory"));
        assert!(err("=/d").contains("empty"));
        assert!(err(&format!("{}=/d", "x".repeat(37))).contains("36 bytes"));
        assert!(err("a b=/d").contains("white space"));
        assert!(err("t=/d,cache=sometimes").contains("sometimes"));
        assert!(err("t=/d,root=").contains("empty root"));
    }
}
