//! S3's error bodies: `<Error><Code>…</Code><Message>…</Message></Error>`.
//! Two fields of a flat document, so a few lines instead of an XML crate
//! (the list and delete answers are parsed by rusty-s3's own types).

/// The text of the first `<tag>…</tag>` in `body`, entities decoded.
fn field(body: &str, tag: &str) -> Option<String> {
    let open = format!("<{tag}>");
    let close = format!("</{tag}>");
    let start = body.find(&open)? + open.len();
    let len = body[start..].find(&close)?;
    Some(unescape(&body[start..start + len]))
}

fn unescape(s: &str) -> String {
    s.replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&amp;", "&")
}

/// `(code, message)` of an S3 error body; empty strings for what is
/// missing (a HEAD answer has no body at all).
pub fn error_fields(body: &str) -> (String, String) {
    (
        field(body, "Code").unwrap_or_default(),
        field(body, "Message").unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_bodies_give_code_and_message() {
        let b = r#"<?xml version="1.0" encoding="UTF-8"?>
<Error><Code>SignatureDoesNotMatch</Code><Message>The request signature we calculated does not match &amp; &lt;so&gt; on</Message><RequestId>1</RequestId></Error>"#;
        let (c, m) = error_fields(b);
        assert_eq!(c, "SignatureDoesNotMatch");
        assert_eq!(
            m,
            "The request signature we calculated does not match & <so> on"
        );
        assert_eq!(error_fields(""), (String::new(), String::new()));
        assert_eq!(
            error_fields("<Error><Code>Slow"),
            (String::new(), String::new())
        );
        assert_eq!(error_fields("<Code></Code>").0, "");
    }
}
