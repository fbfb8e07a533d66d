//! Names why an upstream request got no answer (DNS lookup, connection
//! refused or reset, TLS handshake and why, timeout) by walking the error's
//! `source()` chain. The names are fixed strings: they go into logs and the
//! client's error `detail`, so they carry no URL, host or credential.

use std::error::Error as StdError;

use super::guard::LookupFailed;

/// Why a connection to an upstream failed, as far as the error shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The host name did not resolve.
    Dns,
    /// Nothing listens on the port.
    Refused,
    /// The peer reset or aborted the connection.
    Reset,
    /// Connecting (TCP or TLS) took longer than `upstream.connect_timeout`.
    Timeout,
    /// The certificate's issuer is not a trusted root.
    TlsUnknownIssuer,
    /// The certificate does not name the host.
    TlsNameMismatch,
    /// The certificate is expired or not yet valid.
    TlsExpired,
    /// The certificate is refused for another reason.
    TlsCertificate,
    /// The TLS handshake failed otherwise (protocol, alert, version).
    Tls,
    /// None of the above could be told from the error.
    Other,
}

impl Cause {
    /// The fixed text for logs and the error detail.
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Dns => "dns lookup failed",
            Cause::Refused => "connection refused",
            Cause::Reset => "connection reset",
            Cause::Timeout => "connect timed out",
            Cause::TlsUnknownIssuer => "tls handshake: certificate issuer not trusted",
            Cause::TlsNameMismatch => "tls handshake: certificate not valid for the host name",
            Cause::TlsExpired => "tls handshake: certificate expired or not yet valid",
            Cause::TlsCertificate => "tls handshake: certificate refused",
            Cause::Tls => "tls handshake failed",
            Cause::Other => "connection failed",
        }
    }
}

impl std::fmt::Display for Cause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error and its sources, outermost first. An `io::Error`'s own
/// `source()` skips the error it wraps (rustls puts its error there), so
/// that one is listed too.
pub(crate) fn chain<'a>(
    e: &'a (dyn StdError + 'static),
) -> impl Iterator<Item = &'a (dyn StdError + 'static)> {
    let mut out: Vec<&'a (dyn StdError + 'static)> = Vec::new();
    let mut next = Some(e);
    // Bounded: a cyclic chain would be a bug elsewhere, not a hang here.
    while let Some(e) = next.filter(|_| out.len() < 32) {
        out.push(e);
        // The wrapped error comes next (its sources are the io::Error's),
        // itself perhaps an io::Error: hyper wraps rustls's one again.
        next = match e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner),
            None => e.source(),
        };
    }
    out.into_iter()
}

/// The cause of a failed request.
pub fn classify(e: &(dyn StdError + 'static)) -> Cause {
    for e in chain(e) {
        if e.is::<LookupFailed>() {
            return Cause::Dns;
        }
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return tls_cause(tls);
        }
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            match io.kind() {
                std::io::ErrorKind::ConnectionRefused => return Cause::Refused,
                std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionAborted => {
                    return Cause::Reset
                }
                std::io::ErrorKind::TimedOut => return Cause::Timeout,
                _ => {}
            }
        }
        if e.downcast_ref::<reqwest::Error>()
            .is_some_and(|r| r.is_timeout())
        {
            return Cause::Timeout;
        }
    }
    Cause::Other
}

fn tls_cause(e: &rustls::Error) -> Cause {
    use rustls::CertificateError as C;
    match e {
        rustls::Error::InvalidCertificate(c) => match c {
            C::UnknownIssuer => Cause::TlsUnknownIssuer,
            C::NotValidForName | C::NotValidForNameContext { .. } => Cause::TlsNameMismatch,
            C::Expired
            | C::ExpiredContext { .. }
            | C::NotValidYet
            | C::NotValidYetContext { .. } => Cause::TlsExpired,
            _ => Cause::TlsCertificate,
        },
        _ => Cause::Tls,
    }
}

/// The error's chain as one line, each distinct message once. reqwest's
/// outer message is taken without its URL (it may hold credentials);
/// the inner ones (hyper, io, rustls) name no URL.
pub fn describe(e: reqwest::Error) -> String {
    let e = e.without_url();
    let mut parts: Vec<String> = Vec::new();
    for e in chain(&e) {
        let text = e.to_string();
        if !parts.iter().any(|p| p == &text) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[derive(Debug, thiserror::Error)]
    #[error("client error (Connect)")]
    struct Outer(#[source] io::Error);

    #[test]
    fn causes_are_found_along_the_chain() {
        let refused = Outer(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(classify(&refused), Cause::Refused);
        let reset = Outer(io::Error::from(io::ErrorKind::ConnectionReset));
        assert_eq!(classify(&reset), Cause::Reset);
        let timed_out = Outer(io::Error::from(io::ErrorKind::TimedOut));
        assert_eq!(classify(&timed_out), Cause::Timeout);
        let dns = Outer(io::Error::other(LookupFailed(io::Error::other(
            "failed to lookup address information",
        ))));
        assert_eq!(classify(&dns), Cause::Dns);
        assert_eq!(classify(&Outer(io::Error::other("x"))), Cause::Other);
    }

    #[test]
    fn tls_failures_say_why() {
        use rustls::CertificateError as C;
        for (e, cause) in [
            (C::UnknownIssuer, Cause::TlsUnknownIssuer),
            (C::NotValidForName, Cause::TlsNameMismatch),
            (C::Expired, Cause::TlsExpired),
            (C::NotValidYet, Cause::TlsExpired),
            (C::BadSignature, Cause::TlsCertificate),
        ] {
            // rustls hands its error to hyper inside an io::Error.
            let wrapped = Outer(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(e),
            ));
            assert_eq!(classify(&wrapped), cause);
            // As hyper hands it on: inside a second io::Error.
            let twice = Outer(io::Error::other(io::Error::new(
                io::ErrorKind::InvalidData,
                rustls::Error::InvalidCertificate(C::UnknownIssuer),
            )));
            assert_eq!(classify(&twice), Cause::TlsUnknownIssuer);
        }
        let alert = Outer(io::Error::new(
            io::ErrorKind::InvalidData,
            rustls::Error::AlertReceived(rustls::AlertDescription::HandshakeFailure),
        ));
        assert_eq!(classify(&alert), Cause::Tls);
    }
}
