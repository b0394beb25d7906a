//! An error and its causes as the one line a command prints when it fails.
//!
//! Many of shoal's error messages already name their cause (`cannot open … : No such file`),
//! and also hand it on as `source()`, so a plain walk of the chain repeats it. The line
//! here adds a cause only when the text so far does not already hold it.

/// `e`, then each cause the text does not already hold, joined by ": ".
pub fn one_line(e: &(dyn std::error::Error + 'static)) -> String {
    let mut line = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = c.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::one_line;

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("cannot open initramfs {path}: {source}")]
        Open {
            path: String,
            source: std::io::Error,
        },
    }

    #[derive(Debug, thiserror::Error)]
    #[error("boot failed")]
    struct Outer(#[source] Inner);

    fn not_found() -> std::io::Error {
        std::io::Error::from_raw_os_error(libc::ENOENT)
    }

    #[test]
    fn a_cause_the_message_already_names_is_not_printed_again() {
        let e = Inner::Open {
            path: "/nope".into(),
            source: not_found(),
        };
        assert_eq!(
            one_line(&e),
            "cannot open initramfs /nope: No such file or directory (os error 2)"
        );
        // The walk a command would do without it repeats the cause.
        let naive = format!("{e}: {}", std::error::Error::source(&e).unwrap());
        assert!(naive.ends_with("(os error 2): No such file or directory (os error 2)"));
    }

    #[test]
    fn causes_not_in_the_message_are_added_in_order() {
        let e = Outer(Inner::Open {
            path: "/nope".into(),
            source: not_found(),
        });
        assert_eq!(
            one_line(&e),
            "boot failed: cannot open initramfs /nope: No such file or directory (os error 2)"
        );
        let wrapped = anyhow::Error::from(e).context("shoal-vmm --initrd");
        assert_eq!(
            one_line(wrapped.as_ref()),
            "shoal-vmm --initrd: boot failed: cannot open initramfs /nope: No such file or directory (os error 2)"
        );
    }
}
