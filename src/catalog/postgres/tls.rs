//! TLS to the PostgreSQL catalog, as libpq does it: `sslmode` (`disable`, `prefer`,
//! `require`, `verify-ca`, `verify-full`) and `sslrootcert=FILE` in the URL, else
//! `PGSSLMODE` / `PGSSLROOTCERT`. The `postgres` client itself knows only `disable`,
//! `prefer` and `require` and no `sslrootcert`, so this module takes both out of the
//! URL, decides what to verify, and hands the client a rustls connector
//! (`tokio-postgres-rustls`) that verifies exactly that:
//!
//! - `disable`: plain TCP.
//! - `prefer` (the default, as libpq's): TLS when the server offers it, plain when it
//!   does not, and plain again when a connection over TLS failed (a handshake error, a
//!   `hostnossl` line refusing it: `super::connect` retries); the certificate is not
//!   checked (libpq does not check it either).
//! - `require`: TLS or nothing, the certificate not checked, unless `sslrootcert` is
//!   given, which makes it `verify-ca` (as libpq does).
//! - `verify-ca`: the certificate must chain to `sslrootcert` (default
//!   `~/.postgresql/root.crt`); its names are not compared with the host.
//! - `verify-full`: as `verify-ca`, and the certificate must name the host of the URL
//!   (a DNS name or an IP address in its subjectAltName).
//!
//! A client certificate (`sslcert` and `sslkey`, or `PGSSLCERT` / `PGSSLKEY`, else
//! `~/.postgresql/postgresql.crt` and `.key`) is shown to a server that asks for one
//! (`cert` authentication, or `clientcert=verify-full` in pg_hba.conf).

use crate::error::{Error, Result};
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tokio_postgres::Socket;
use tokio_postgres::tls::{MakeTlsConnect, TlsConnect};

/// libpq's `sslmode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Option<SslMode> {
        Some(match s {
            "disable" => SslMode::Disable,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }
}

/// What the connection does about TLS.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    /// The CA certificates (PEM) the server's certificate must chain to.
    pub root_cert: Option<PathBuf>,
    /// The client certificate shown to the server, if any.
    pub client_cert: Option<PathBuf>,
    /// The rustls client configuration (None for `disable`), built once.
    config: Option<Arc<rustls::ClientConfig>>,
}

impl Tls {
    /// The client's `ssl_mode`: what it does when the server does not offer TLS.
    pub fn client_mode(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// The connector to hand `tokio_postgres::Config::connect` (None: plain, `NoTls`). Its
    /// `started` flag tells afterwards whether the server agreed to TLS (a handshake
    /// began), so that `prefer` retries without TLS only what TLS may have caused.
    pub fn connector(&self) -> Option<Watched> {
        self.config.as_ref().map(|c| Watched {
            inner: tokio_postgres_rustls::MakeRustlsConnect::new((**c).clone()),
            started: Arc::new(AtomicBool::new(false)),
        })
    }

    /// What to do about a connection that failed with `what` (the client's message), for
    /// failures TLS explains; None when TLS has nothing to say about it.
    pub fn explain(&self, e: &tokio_postgres::Error, what: &str) -> Option<String> {
        let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(e);
        let mut rustls_error = None;
        while let Some(c) = cause {
            if let Some(r) = c.downcast_ref::<rustls::Error>() {
                rustls_error = Some(r.clone());
            }
            if let Some(io) = c.downcast_ref::<std::io::Error>()
                && let Some(r) = io.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
            {
                rustls_error = Some(r.clone());
            }
            cause = c.source();
        }
        let root = self.root_cert.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
        let mode = self.mode.name();
        if what.contains("server does not support TLS") {
            return Some(format!(
                "the server does not offer TLS and sslmode={mode} requires it; turn TLS on at the server \
                 (ssl = on in postgresql.conf) or use sslmode=prefer"
            ));
        }
        let client = self.client_cert.as_ref().map(|p| p.display().to_string());
        match rustls_error? {
            // The server would not take the client certificate (or wanted one).
            rustls::Error::AlertReceived(
                a @ (rustls::AlertDescription::UnknownCA
                | rustls::AlertDescription::BadCertificate
                | rustls::AlertDescription::CertificateRequired
                | rustls::AlertDescription::CertificateUnknown
                | rustls::AlertDescription::CertificateExpired
                | rustls::AlertDescription::AccessDenied),
            ) => Some(match client {
                Some(c) => format!(
                    "the server did not accept the client certificate sslcert={c} ({a:?}); it must be signed by a CA the server trusts (its ssl_ca_file) and still valid"
                ),
                None => format!(
                    "the server asks for a client certificate ({a:?}); name one with sslcert=FILE&sslkey=FILE in the URL"
                ),
            }),
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
            | rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => Some(format!(
                "the server's certificate does not name the host of the URL (sslmode={mode}); connect by a name \
                 its certificate holds, or use sslmode=verify-ca to check only that {root} signed it"
            )),
            rustls::Error::InvalidCertificate(c) => Some(format!(
                "the server's certificate is not trusted ({c:?}, sslmode={mode}): sslrootcert={root} must hold the \
                 CA certificate that signed the server's"
            )),
            r => Some(format!("TLS failed ({r}, sslmode={mode})")),
        }
    }
}

/// The rustls connector, noting whether a TLS handshake began: the client calls
/// `TlsConnect::connect` only once the server answered yes to its TLS request.
#[derive(Clone)]
pub struct Watched {
    inner: tokio_postgres_rustls::MakeRustlsConnect,
    pub started: Arc<AtomicBool>,
}

impl MakeTlsConnect<Socket> for Watched {
    type Stream = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Stream;
    type TlsConnect = WatchedConnect<<tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::TlsConnect>;
    type Error = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::Error;

    fn make_tls_connect(&mut self, domain: &str) -> std::result::Result<Self::TlsConnect, Self::Error> {
        let inner = <tokio_postgres_rustls::MakeRustlsConnect as MakeTlsConnect<Socket>>::make_tls_connect(
            &mut self.inner,
            domain,
        )?;
        Ok(WatchedConnect(inner, self.started.clone()))
    }
}

pub struct WatchedConnect<T>(T, Arc<AtomicBool>);

impl<T: TlsConnect<Socket>> TlsConnect<Socket> for WatchedConnect<T> {
    type Stream = T::Stream;
    type Error = T::Error;
    type Future = T::Future;

    fn connect(self, stream: Socket) -> T::Future {
        self.1.store(true, Ordering::SeqCst);
        self.0.connect(stream)
    }
}

/// Takes `sslmode` and `sslrootcert` out of `url` (the client does not know
/// `verify-ca`, `verify-full` nor `sslrootcert`); returns the URL left and what the
/// connection does about TLS. `PGSSLMODE` and `PGSSLROOTCERT` apply when the URL says
/// nothing. `name` is the URL without its password, for messages.
pub fn from_url(url: &str, name: &str) -> Result<(String, Tls)> {
    let env = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
    let mut mode_text = None;
    let mut root = None;
    let (mut cert, mut key) = (None, None);
    let mut rest = url.to_string();
    // The ssl* parameters are taken out; every other one is kept byte for byte (the
    // client decodes percent-encoding only: a '+' is a plus sign, `%20` a space).
    if let Some((base, query)) = url.split_once('?') {
        let mut kept = Vec::new();
        for part in query.split('&') {
            let (k, v) = part.split_once('=').unwrap_or((part, ""));
            match percent_decode(k).as_str() {
                "sslmode" => mode_text = Some(percent_decode(v)),
                "sslrootcert" => root = Some(percent_decode(v)),
                "sslcert" => cert = Some(percent_decode(v)),
                "sslkey" => key = Some(percent_decode(v)),
                _ => kept.push(part),
            }
        }
        rest = if kept.is_empty() { base.to_string() } else { format!("{base}?{}", kept.join("&")) };
    }
    let mode_text = mode_text.or_else(|| env("PGSSLMODE"));
    let mode = match &mode_text {
        None => SslMode::Prefer,
        Some(m) => SslMode::parse(m).ok_or_else(|| {
            Error::Config(format!(
                "database {name}: sslmode={m} is not a mode keepfs knows; use disable, prefer, require, verify-ca \
                 or verify-full"
            ))
        })?,
    };
    let root = root.or_else(|| env("PGSSLROOTCERT")).map(PathBuf::from);
    // libpq: `require` with a root certificate named verifies the chain (verify-ca);
    // verify-ca and verify-full without one use ~/.postgresql/root.crt.
    let (mode, root) = match (mode, root) {
        (SslMode::Require, Some(r)) => (SslMode::VerifyCa, Some(r)),
        (SslMode::VerifyCa | SslMode::VerifyFull, None) => {
            let default = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql/root.crt"));
            match default.filter(|p| p.exists()) {
                Some(p) => (mode, Some(p)),
                None => {
                    return Err(Error::Config(format!(
                        "database {name}: sslmode={} checks the server's certificate, and no CA certificate is \
                         named; add sslrootcert=/path/ca.pem to the URL (or PGSSLROOTCERT, or put it in \
                         ~/.postgresql/root.crt)",
                        mode.name()
                    )));
                }
            }
        }
        (m, r) => (m, r),
    };
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let verifier: Option<Arc<dyn ServerCertVerifier>> = match mode {
        SslMode::Disable => None,
        SslMode::Prefer | SslMode::Require => Some(Arc::new(NoCheck(provider.clone()))),
        SslMode::VerifyCa | SslMode::VerifyFull => {
            let file = root.as_ref().ok_or_else(|| Error::Other("internal: verify without a root".into()))?;
            let mut store = RootCertStore::empty();
            let certs = CertificateDer::pem_file_iter(file)
                .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
                .map_err(|e| {
                    Error::Config(format!(
                        "database {name}: sslrootcert {}: cannot read CA certificates from it ({e}); name a PEM \
                         file holding the CA that signed the server's certificate",
                        file.display()
                    ))
                })?;
            let (added, _) = store.add_parsable_certificates(certs);
            if added == 0 {
                return Err(Error::Config(format!(
                    "database {name}: sslrootcert {} holds no usable CA certificate; name a PEM file holding the \
                     CA that signed the server's certificate",
                    file.display()
                )));
            }
            let webpki = WebPkiServerVerifier::builder_with_provider(Arc::new(store), provider.clone())
                .build()
                .map_err(|e| Error::Config(format!("database {name}: sslrootcert {}: {e}", file.display())))?;
            Some(if mode == SslMode::VerifyCa { Arc::new(ChainOnly(webpki)) } else { webpki })
        }
    };
    // Read only when TLS may be used, as libpq (a stray PGSSLKEY must not break a plain
    // connection).
    let client = match verifier {
        None => None,
        Some(_) => client_cert(cert.or_else(|| env("PGSSLCERT")), key.or_else(|| env("PGSSLKEY")), name)?,
    };
    let config = match verifier {
        None => None,
        Some(v) => {
            let builder = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::Other(format!("TLS for the catalog: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(v);
            Some(Arc::new(match &client {
                None => builder.with_no_client_auth(),
                Some(c) => builder.with_client_auth_cert(c.chain.clone(), c.key.clone_key()).map_err(|e| {
                    Error::Config(format!(
                        "database {name}: sslkey {} does not fit sslcert {} ({e}); name the key of that certificate",
                        c.key_file.display(),
                        c.cert_file.display()
                    ))
                })?,
            }))
        }
    };
    let client_cert = client.map(|c| c.cert_file);
    Ok((rest, Tls { mode, root_cert: root, client_cert, config }))
}

/// A client certificate and its key, as the server may ask for (`cert` in pg_hba.conf).
struct ClientCert {
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
    cert_file: PathBuf,
    key_file: PathBuf,
}

/// The client certificate: `sslcert` and `sslkey` (or `PGSSLCERT` / `PGSSLKEY`), else
/// `~/.postgresql/postgresql.crt` and `.key` when they exist, as libpq. A key that
/// others may read is refused, as libpq refuses it.
fn client_cert(cert: Option<String>, key: Option<String>, name: &str) -> Result<Option<ClientCert>> {
    let home = std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".postgresql"));
    let (cert_file, key_file) = match (cert, key) {
        (Some(c), Some(k)) => (PathBuf::from(c), PathBuf::from(k)),
        (Some(c), None) => match home.as_ref().map(|h| h.join("postgresql.key")).filter(|p| p.exists()) {
            Some(k) => (PathBuf::from(c), k),
            None => {
                return Err(Error::Config(format!(
                    "database {name}: sslcert={c} names a client certificate but no sslkey its key; add sslkey=/path/client.key to the URL"
                )));
            }
        },
        (None, Some(k)) => {
            return Err(Error::Config(format!(
                "database {name}: sslkey={k} names a key but no sslcert its certificate; add sslcert=/path/client.crt to the URL"
            )));
        }
        (None, None) => {
            let Some(h) = home else { return Ok(None) };
            let (c, k) = (h.join("postgresql.crt"), h.join("postgresql.key"));
            if !c.exists() || !k.exists() {
                return Ok(None);
            }
            (c, k)
        }
    };
    let chain = CertificateDer::pem_file_iter(&cert_file)
        .and_then(|it| it.collect::<std::result::Result<Vec<_>, _>>())
        .map_err(|e| {
            Error::Config(format!(
                "database {name}: sslcert {}: cannot read a certificate from it ({e}); name the PEM file of this client's certificate",
                cert_file.display()
            ))
        })?;
    if chain.is_empty() {
        return Err(Error::Config(format!(
            "database {name}: sslcert {} holds no certificate; name the PEM file of this client's certificate",
            cert_file.display()
        )));
    }
    check_key_mode(&key_file, name)?;
    let key = PrivateKeyDer::from_pem_file(&key_file).map_err(|e| {
        Error::Config(format!(
            "database {name}: sslkey {}: cannot read a private key from it ({e}); name the PEM file of the key of sslcert {}",
            key_file.display(),
            cert_file.display()
        ))
    })?;
    Ok(Some(ClientCert { chain, key, cert_file, key_file }))
}

/// libpq's rule for a client key: owned by this user and readable by it alone (0600),
/// or owned by root and readable by root's group at most (0640).
fn check_key_mode(file: &std::path::Path, name: &str) -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(file).map_err(|e| {
        Error::Config(format!("database {name}: sslkey {}: {e}; name the client certificate's key", file.display()))
    })?;
    let mode = meta.mode() & 0o777;
    // SAFETY: geteuid has no preconditions and cannot fail.
    let me = unsafe { libc::geteuid() };
    let allowed = if meta.uid() == me {
        0o600
    } else if meta.uid() == 0 {
        0o640
    } else {
        return Err(Error::Config(format!(
            "database {name}: sslkey {} belongs to another user; it must belong to this user (or root), as libpq requires",
            file.display()
        )));
    };
    if mode & !allowed != 0 {
        return Err(Error::Config(format!(
            "database {name}: sslkey {} may be read by others (mode {mode:04o}); chmod {allowed:04o} it, as libpq requires of a private key",
            file.display()
        )));
    }
    Ok(())
}

/// `prefer` and `require`: encrypt, check nothing about the certificate (the handshake's
/// signatures are still verified, so the session key belongs to whoever holds it).
#[derive(Debug)]
struct NoCheck(Arc<CryptoProvider>);

impl ServerCertVerifier for NoCheck {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// `verify-ca`: the full WebPKI check (chain to the root, validity dates, usage) except
/// the comparison of the certificate's names with the host, which WebPKI makes last.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        match self.0.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `s` with its `%XX` escapes decoded (and nothing else: a '+' stays a plus sign).
pub(crate) fn percent_decode(s: &str) -> String {
    percent_encoding::percent_decode_str(s).decode_utf8_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameters other than ssl* reach the client byte for byte: it decodes `%XX`
    /// only, so a '+' must stay a plus sign (a generated password) and `%20` a space.
    #[test]
    fn other_parameters_are_kept_byte_for_byte() {
        let url = "postgresql://h/db?password=ab+cd%2F&sslmode=disable&options=-c%20lock_timeout%3D2000";
        let (rest, _) = from_url(url, "x").unwrap();
        assert_eq!(rest, "postgresql://h/db?password=ab+cd%2F&options=-c%20lock_timeout%3D2000");
        // An ssl* value is decoded: this one names /nonexistent/a+b.pem.
        let e = from_url("postgresql://h/db?sslrootcert=/nonexistent/a%2Bb.pem&sslmode=require", "x").err().unwrap();
        assert!(e.to_string().contains("/nonexistent/a+b.pem"), "{e}");
    }

    /// As libpq: client certificate settings are read only when TLS may be used, so a
    /// stray or broken one never breaks a plain connection; with TLS they are checked.
    #[test]
    fn client_certificate_settings_matter_only_with_tls() {
        let url = "postgresql://h/db?sslmode=disable&sslkey=/nonexistent/client.key&sslcert=/nonexistent/c.crt";
        let (rest, tls) = from_url(url, "x").unwrap();
        assert_eq!(rest, "postgresql://h/db", "taken out of the URL even so");
        assert!(tls.client_cert.is_none());
        let e = from_url(&url.replace("disable", "require"), "x").err().unwrap();
        assert!(e.to_string().contains("sslcert /nonexistent/c.crt"), "{e}");
    }

    #[test]
    fn sslmode_and_sslrootcert_leave_the_url_and_other_options_stay() {
        let dir = tempfile::tempdir().unwrap();
        let (rest, tls) = from_url("postgresql://u:p@h:5/db?sslmode=require&connect_timeout=3", "x").unwrap();
        assert_eq!(rest, "postgresql://u:p@h:5/db?connect_timeout=3");
        assert_eq!(tls.mode, SslMode::Require);
        assert!(tls.connector().is_some());
        let (rest, tls) = from_url("postgresql://h/db?sslmode=disable", "x").unwrap();
        assert_eq!(rest, "postgresql://h/db");
        assert_eq!(tls.mode, SslMode::Disable);
        assert!(tls.connector().is_none());
        let e = from_url("postgresql://h/db?sslmode=verify", "x").err().unwrap();
        assert!(e.to_string().contains("sslmode=verify is not a mode"), "{e}");
        let missing = dir.path().join("none.pem");
        let e = from_url(&format!("postgresql://h/db?sslmode=verify-full&sslrootcert={}", missing.display()), "x")
            .err()
            .unwrap();
        assert!(e.to_string().contains("cannot read CA certificates"), "{e}");
        assert_eq!(e.exit_code(), crate::error::exit::USAGE);
    }
}
