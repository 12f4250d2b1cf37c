//! DNS for the outbound relay (ARCHITECTURE.md §11): MX, TLSA, TXT and address lookups
//! through one configured DNSSEC-validating resolver, whose AD bit mailmoat trusts (a
//! resolver on loopback or a trusted path; mailmoat validates nothing itself).
//!
//! Every query asks for DNSSEC (EDNS0 with DO, RFC 4035 §3.2.1, and AD, RFC 6840 §5.7:
//! a validating resolver sets AD in its reply only when the query carries one of them),
//! goes over UDP and again over TCP when the reply is truncated (RFC 7766 §5), and has
//! one deadline for all of it. Each [`Answer`] says whether it is `secure` (the AD bit)
//! and what was found: records, no records of that type (NODATA), or no such name
//! (NXDOMAIN). A secure NODATA or NXDOMAIN is an authenticated denial, which for a TLSA
//! lookup means "no DANE" (RFC 7672 §2.2); SERVFAIL, which is what a validating resolver
//! answers for bogus data, is an [`Error`]: the relay defers.
//!
//! The resolver follows CNAMEs; an answer's `name` is the end of the chain it put in the
//! answer section (RFC 7672 §2.2.2 looks TLSA records up there).
//!
//! Message encoding and decoding is `hickory-proto`'s; the rest (the question a reply
//! must match, the CNAME chain, what an answer means) is [`interpret`], which does no
//! I/O and is tested on its own.

use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::opt::{EdnsCode, EdnsOption};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::{Instant, timeout_at};

/// How long a lookup may take, both transports and every retransmission included.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(5);

/// UDP queries sent per lookup: the first and the retransmissions, spread over the
/// timeout.
const UDP_SENDS: u32 = 3;

/// The EDNS0 payload size offered (the DNS flag day 2020 value: no IP fragmentation).
const EDNS_PAYLOAD: u16 = 1232;

/// Larger than any reply within [`EDNS_PAYLOAD`]; a larger datagram is cut to this and
/// fails to decode.
const UDP_BUFFER: usize = 4096;

/// Replies that are not to our query (another ID, another question) ignored per lookup;
/// one more fails it.
const MAX_STRAY_REPLIES: usize = 16;

/// CNAMEs followed in one answer section.
const MAX_CNAME_CHAIN: usize = 8;

/// EDNS option code of an Extended DNS Error (RFC 8914 §2).
const EDE_OPTION: u16 = 15;

/// A DNS failure. Each one names the resolver and the question.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The name cannot be put in a query.
    #[error("not a domain name: {name:?} ({reason})")]
    InvalidName { name: String, reason: String },
    /// No usable reply before the deadline.
    #[error("resolver {server}: no answer to {question} within {limit:?}")]
    Timeout {
        server: SocketAddr,
        question: String,
        limit: Duration,
    },
    /// The socket failed (refused, unreachable, reset).
    #[error("resolver {server}: {question}: {source}")]
    Io {
        server: SocketAddr,
        question: String,
        #[source]
        source: std::io::Error,
    },
    /// The reply could not be read, or over TCP answered another question.
    #[error("resolver {server}: malformed reply to {question}: {detail}")]
    Malformed {
        server: SocketAddr,
        question: String,
        detail: String,
    },
    /// SERVFAIL: the resolver could not get a validated answer (bogus DNSSEC, or the
    /// authoritative servers failed). `extended` is its Extended DNS Error, if it gave one
    /// (RFC 8914), e.g. `DNSSEC Bogus (6)`.
    #[error("resolver {server}: SERVFAIL for {question}{}", in_parentheses(.extended))]
    ServFail {
        server: SocketAddr,
        question: String,
        extended: Option<String>,
    },
    /// Any other error code (REFUSED, FORMERR, NOTIMP...).
    #[error("resolver {server}: {rcode} for {question}")]
    Rcode {
        server: SocketAddr,
        question: String,
        rcode: String,
    },
    /// The answer section's CNAMEs loop or go on for longer than [`MAX_CNAME_CHAIN`].
    #[error(
        "resolver {server}: CNAME chain from {question} loops or is longer than {MAX_CNAME_CHAIN}"
    )]
    CnameChain {
        server: SocketAddr,
        question: String,
    },
    /// The system's random generator failed (for the query ID).
    #[error("no randomness for a DNS query ID")]
    Random,
}

/// `" (text)"`, or nothing.
fn in_parentheses(text: &Option<String>) -> String {
    text.as_ref().map(|t| format!(" ({t})")).unwrap_or_default()
}

/// What a lookup found, and whether the resolver validated it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Answer<T> {
    /// The name the outcome is about: the queried name, or the end of the CNAME chain
    /// from it. Lower case, without the final dot.
    pub name: String,
    /// The resolver's AD bit: every record in the reply's answer and authority sections,
    /// the CNAMEs and a denial's proof included, was validated (RFC 4035 §3.2.3).
    pub secure: bool,
    pub outcome: Outcome<T>,
}

impl<T> Answer<T> {
    /// The records, if there are any.
    pub fn found(&self) -> Option<&T> {
        match &self.outcome {
            Outcome::Found(records) => Some(records),
            Outcome::NoData | Outcome::NxDomain => None,
        }
    }
}

/// Records, or which kind of "none".
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome<T> {
    /// At least one record.
    Found(T),
    /// The name exists but has no record of the type asked (NOERROR, empty answer).
    NoData,
    /// The name does not exist (NXDOMAIN).
    NxDomain,
}

/// An MX record (RFC 5321 §5.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mx {
    pub preference: u16,
    /// The host, lower case, without the final dot; empty for the root (a null MX).
    pub exchange: String,
}

impl Mx {
    /// "This domain accepts no mail" (RFC 7505 §3): the exchange is the root.
    pub fn is_null(&self) -> bool {
        self.exchange.is_empty()
    }
}

/// A TLSA record (RFC 6698 §2.1), its fields as numbers: RFC 7672 §2.2 says which
/// values a client uses, and the others are for the caller to skip.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tlsa {
    pub usage: u8,
    pub selector: u8,
    pub matching: u8,
    /// The certificate association data.
    pub data: Vec<u8>,
}

/// The resolver to ask, and how long to wait.
#[derive(Debug, Clone)]
pub struct Resolver {
    server: SocketAddr,
    timeout: Duration,
}

impl Resolver {
    /// The validating resolver at `server`, with [`DEFAULT_TIMEOUT`].
    pub fn new(server: SocketAddr) -> Resolver {
        Resolver {
            server,
            timeout: DEFAULT_TIMEOUT,
        }
    }

    /// The same resolver with another deadline per lookup.
    pub fn with_timeout(mut self, timeout: Duration) -> Resolver {
        self.timeout = timeout;
        self
    }

    pub fn server(&self) -> SocketAddr {
        self.server
    }

    /// The MX records of `domain`.
    pub async fn lookup_mx(&self, domain: &str) -> Result<Answer<Vec<Mx>>, Error> {
        self.lookup(domain, RecordType::MX, |data| match data {
            RData::MX(mx) => Some(Mx {
                preference: mx.preference,
                exchange: presentation(&mx.exchange),
            }),
            _ => None,
        })
        .await
    }

    /// The TLSA records of TCP `port` at `host`: `_port._tcp.host` (RFC 6698 §3).
    pub async fn lookup_tlsa(&self, port: u16, host: &str) -> Result<Answer<Vec<Tlsa>>, Error> {
        let name = format!("_{port}._tcp.{}", host.trim_end_matches('.'));
        self.lookup(&name, RecordType::TLSA, |data| match data {
            RData::TLSA(tlsa) => Some(Tlsa {
                usage: tlsa.cert_usage.into(),
                selector: tlsa.selector.into(),
                matching: tlsa.matching.into(),
                data: tlsa.cert_data.clone(),
            }),
            _ => None,
        })
        .await
    }

    /// The TXT records of `name`, each one's strings joined (as RFC 8461 §3.1 and RFC
    /// 8460 §3 read them).
    pub async fn lookup_txt(&self, name: &str) -> Result<Answer<Vec<Vec<u8>>>, Error> {
        self.lookup(name, RecordType::TXT, |data| match data {
            RData::TXT(txt) => Some(txt.txt_data.concat()),
            _ => None,
        })
        .await
    }

    /// The addresses of `host`: A and AAAA, asked at once. Secure only if both answers
    /// are; either one failing fails the lookup.
    pub async fn lookup_ip(&self, host: &str) -> Result<Answer<Vec<IpAddr>>, Error> {
        let (v4, v6) = tokio::join!(
            self.lookup(host, RecordType::A, |data| match data {
                RData::A(a) => Some(IpAddr::V4(a.0)),
                _ => None,
            }),
            self.lookup(host, RecordType::AAAA, |data| match data {
                RData::AAAA(aaaa) => Some(IpAddr::V6(aaaa.0)),
                _ => None,
            }),
        );
        let (v4, v6) = (v4?, v6?);
        let secure = v4.secure && v6.secure;
        let name = v4.name.clone();
        let outcome = match (v4.outcome, v6.outcome) {
            (Outcome::Found(mut all), Outcome::Found(more)) => {
                all.extend(more);
                Outcome::Found(all)
            }
            (Outcome::Found(found), _) | (_, Outcome::Found(found)) => Outcome::Found(found),
            (Outcome::NxDomain, Outcome::NxDomain) => Outcome::NxDomain,
            _ => Outcome::NoData,
        };
        Ok(Answer {
            name,
            secure,
            outcome,
        })
    }

    /// One question, asked and interpreted: the records of `rtype` at the end of the
    /// CNAME chain from `name`, each turned into a `T` by `pick`.
    async fn lookup<T>(
        &self,
        name: &str,
        rtype: RecordType,
        pick: impl Fn(&RData) -> Option<T>,
    ) -> Result<Answer<Vec<T>>, Error> {
        let qname = query_name(name)?;
        let question = format!("{rtype} {}", presentation(&qname));
        let deadline = Instant::now() + self.timeout;
        let exchanged = timeout_at(deadline, self.exchange(&qname, rtype, &question)).await;
        let reply = exchanged.unwrap_or_else(|_| {
            Err(Error::Timeout {
                server: self.server,
                question: question.clone(),
                limit: self.timeout,
            })
        })?;
        answer(&qname, rtype, &reply, pick).map_err(|problem| self.error(&question, problem))
    }

    /// The reply to one query: over UDP, then over TCP if it came truncated.
    async fn exchange(
        &self,
        qname: &Name,
        rtype: RecordType,
        question: &str,
    ) -> Result<Message, Error> {
        let mut id = [0u8; 2];
        aws_lc_rs::rand::fill(&mut id).map_err(|_| Error::Random)?;
        let id = u16::from_be_bytes(id);
        let query = query_message(id, qname, rtype)
            .to_vec()
            .map_err(|e| Error::InvalidName {
                name: presentation(qname),
                reason: e.to_string(),
            })?;
        let io = |source| Error::Io {
            server: self.server,
            question: question.to_owned(),
            source,
        };
        let fail = |problem| self.error(question, problem);
        match self.udp(&query, id, qname, rtype).await {
            Ok(reply) => Ok(reply),
            Err(Failure::Io(e)) => Err(io(e)),
            Err(Failure::Problem(Problem::Truncated)) => self
                .tcp(&query, id, qname, rtype)
                .await
                .map_err(|failure| match failure {
                    Failure::Io(e) => io(e),
                    Failure::Problem(problem) => fail(problem),
                }),
            Err(Failure::Problem(problem)) => Err(fail(problem)),
        }
    }

    /// Sends the query over UDP, again every `timeout / UDP_SENDS` without a reply, and
    /// returns the first reply to it; the caller's deadline ends the wait.
    async fn udp(
        &self,
        query: &[u8],
        id: u16,
        qname: &Name,
        rtype: RecordType,
    ) -> Result<Message, Failure> {
        let local: SocketAddr = match self.server {
            SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let socket = UdpSocket::bind(local).await.map_err(Failure::Io)?;
        // Connected: the kernel drops datagrams from anyone but the resolver, and an
        // ICMP "port unreachable" ends the wait at once (ECONNREFUSED).
        socket.connect(self.server).await.map_err(Failure::Io)?;
        let mut buffer = vec![0u8; UDP_BUFFER];
        let mut strays = 0;
        let resend = self.timeout / UDP_SENDS;
        for send in 1..=UDP_SENDS {
            socket.send(query).await.map_err(Failure::Io)?;
            // After the last send, wait for as long as the caller lets us.
            let until = (send < UDP_SENDS).then(|| Instant::now() + resend);
            loop {
                let received = match until {
                    Some(until) => match timeout_at(until, socket.recv(&mut buffer)).await {
                        Ok(received) => received,
                        Err(_) => break,
                    },
                    None => socket.recv(&mut buffer).await,
                };
                let length = received.map_err(Failure::Io)?;
                match interpret(id, qname, rtype, &buffer[..length]) {
                    Err(Problem::Stray) => {
                        strays += 1;
                        if strays > MAX_STRAY_REPLIES {
                            return Err(Failure::Problem(Problem::Malformed(format!(
                                "more than {MAX_STRAY_REPLIES} replies to other queries"
                            ))));
                        }
                    }
                    other => return other.map_err(Failure::Problem),
                }
            }
        }
        // The last send's wait has no end of its own: only the caller's deadline.
        std::future::pending().await
    }

    /// The query over TCP (RFC 1035 §4.2.2: each message after its two-byte length).
    async fn tcp(
        &self,
        query: &[u8],
        id: u16,
        qname: &Name,
        rtype: RecordType,
    ) -> Result<Message, Failure> {
        let mut stream = TcpStream::connect(self.server).await.map_err(Failure::Io)?;
        let length = u16::try_from(query.len())
            .map_err(|_| Failure::Problem(Problem::Malformed("query too long".into())))?;
        let mut framed = Vec::with_capacity(2 + query.len());
        framed.extend_from_slice(&length.to_be_bytes());
        framed.extend_from_slice(query);
        stream.write_all(&framed).await.map_err(Failure::Io)?;
        let mut length = [0u8; 2];
        stream.read_exact(&mut length).await.map_err(Failure::Io)?;
        let mut reply = vec![0u8; usize::from(u16::from_be_bytes(length))];
        stream.read_exact(&mut reply).await.map_err(Failure::Io)?;
        match interpret(id, qname, rtype, &reply) {
            // One query on this connection: anything else is the resolver's mistake.
            Err(Problem::Stray) => Err(Problem::Malformed("a reply to another query".into())),
            Err(Problem::Truncated) => Err(Problem::Malformed("truncated over TCP".into())),
            other => other,
        }
        .map_err(Failure::Problem)
    }

    fn error(&self, question: &str, problem: Problem) -> Error {
        let server = self.server;
        let question = question.to_owned();
        match problem {
            Problem::Stray | Problem::Truncated => Error::Malformed {
                server,
                question,
                detail: "no usable reply".into(),
            },
            Problem::Malformed(detail) => Error::Malformed {
                server,
                question,
                detail,
            },
            Problem::ServFail(extended) => Error::ServFail {
                server,
                question,
                extended,
            },
            Problem::Rcode(rcode) => Error::Rcode {
                server,
                question,
                rcode,
            },
            Problem::CnameChain => Error::CnameChain { server, question },
        }
    }
}

/// Why a reply is no answer, before it is an [`Error`] naming the resolver.
#[derive(Debug, PartialEq, Eq)]
enum Problem {
    /// A well-formed reply, but not to this query (another ID or question), or no reply.
    Stray,
    /// TC set: ask again over TCP.
    Truncated,
    Malformed(String),
    ServFail(Option<String>),
    Rcode(String),
    CnameChain,
}

/// A transport's failure: the socket's, or the reply's.
#[derive(Debug)]
enum Failure {
    Io(std::io::Error),
    Problem(Problem),
}

/// `name` as an absolute query name.
fn query_name(name: &str) -> Result<Name, Error> {
    let invalid = |reason: String| Error::InvalidName {
        name: name.to_owned(),
        reason,
    };
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return Err(invalid("empty".into()));
    }
    if !trimmed.is_ascii() {
        return Err(invalid(
            "not ASCII (an IDN goes in its A-label form)".into(),
        ));
    }
    let mut parsed = Name::from_ascii(trimmed).map_err(|e| invalid(e.to_string()))?;
    parsed.set_fqdn(true);
    Ok(parsed)
}

/// `name` in lower case without the final dot; the root is empty.
fn presentation(name: &Name) -> String {
    let ascii = name.to_lowercase().to_ascii();
    ascii.strip_suffix('.').unwrap_or(&ascii).to_owned()
}

/// The query: recursion desired, AD (RFC 6840 §5.7), EDNS0 with DO (RFC 3225) and a
/// payload of [`EDNS_PAYLOAD`].
fn query_message(id: u16, qname: &Name, rtype: RecordType) -> Message {
    let mut message = Message::new(id, MessageType::Query, OpCode::Query);
    message.metadata.recursion_desired = true;
    message.metadata.authentic_data = true;
    let mut query = Query::query(qname.clone(), rtype);
    query.set_query_class(DNSClass::IN);
    message.add_query(query);
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD).set_dnssec_ok(true);
    message.set_edns(edns);
    message
}

/// The reply in `bytes`, if it is the answer to query `id` for `qname` and `rtype`: a
/// response, with that ID and that one question, not truncated, NOERROR or NXDOMAIN.
fn interpret(id: u16, qname: &Name, rtype: RecordType, bytes: &[u8]) -> Result<Message, Problem> {
    let reply = Message::from_vec(bytes).map_err(|e| Problem::Malformed(e.to_string()))?;
    let meta = &reply.metadata;
    if meta.id != id || meta.message_type != MessageType::Response || meta.op_code != OpCode::Query
    {
        return Err(Problem::Stray);
    }
    // The question is echoed (RFC 1035 §4.1.1); names compare without case.
    match reply.queries.as_slice() {
        [query]
            if query.name().eq_ignore_root(qname)
                && query.query_type() == rtype
                && query.query_class() == DNSClass::IN => {}
        _ => return Err(Problem::Stray),
    }
    if meta.truncation {
        return Err(Problem::Truncated);
    }
    match meta.response_code {
        ResponseCode::NoError | ResponseCode::NXDomain => Ok(reply),
        ResponseCode::ServFail => Err(Problem::ServFail(extended_error(&reply))),
        other => Err(Problem::Rcode(format!("{other:?} ({})", u16::from(other)))),
    }
}

/// The reply's Extended DNS Error (RFC 8914 §2: INFO-CODE, then UTF-8 EXTRA-TEXT), as
/// `"DNSSEC Bogus (6)"` or `"DNSSEC Bogus (6): <text>"`.
fn extended_error(reply: &Message) -> Option<String> {
    let option = reply.edns.as_ref()?.option(EdnsCode::from(EDE_OPTION))?;
    let EdnsOption::Unknown(_, data) = option else {
        return None;
    };
    let code = u16::from_be_bytes([*data.first()?, *data.get(1)?]);
    let name = EDE_NAMES
        .get(usize::from(code))
        .copied()
        .unwrap_or("Extended DNS Error");
    let text = String::from_utf8_lossy(&data[2..]);
    Some(if text.is_empty() {
        format!("{name} ({code})")
    } else {
        format!("{name} ({code}): {text}")
    })
}

/// The names of the Extended DNS Error codes of RFC 8914 §4, by code.
const EDE_NAMES: [&str; 25] = [
    "Other Error",
    "Unsupported DNSKEY Algorithm",
    "Unsupported DS Digest Type",
    "Stale Answer",
    "Forged Answer",
    "DNSSEC Indeterminate",
    "DNSSEC Bogus",
    "Signature Expired",
    "Signature Not Yet Valid",
    "DNSKEY Missing",
    "RRSIGs Missing",
    "No Zone Key Bit Set",
    "NSEC Missing",
    "Cached Error",
    "Not Ready",
    "Blocked",
    "Censored",
    "Filtered",
    "Prohibited",
    "Stale NXDomain Answer",
    "Not Authoritative",
    "Not Supported",
    "No Reachable Authority",
    "Network Error",
    "Invalid Data",
];

/// What `reply` (checked by [`interpret`]) says about `rtype` at `qname`: the records at
/// the end of the CNAME chain from it, turned into `T`s by `pick`.
fn answer<T>(
    qname: &Name,
    rtype: RecordType,
    reply: &Message,
    pick: impl Fn(&RData) -> Option<T>,
) -> Result<Answer<Vec<T>>, Problem> {
    let owned_by = |record: &Record, name: &Name| record.name.eq_ignore_root(name);
    let mut name = qname.clone();
    let mut found = Vec::new();
    for _ in 0..=MAX_CNAME_CHAIN {
        found.extend(
            reply
                .answers
                .iter()
                .filter(|r| r.record_type() == rtype && owned_by(r, &name))
                .filter_map(|r| pick(&r.data)),
        );
        if !found.is_empty() {
            break;
        }
        let next = reply.answers.iter().find_map(|r| match &r.data {
            RData::CNAME(target) if owned_by(r, &name) => Some(target.0.clone()),
            _ => None,
        });
        match next {
            Some(target) => name = target,
            None => {
                return Ok(Answer {
                    name: presentation(&name),
                    secure: reply.metadata.authentic_data,
                    outcome: match reply.metadata.response_code {
                        ResponseCode::NXDomain => Outcome::NxDomain,
                        _ => Outcome::NoData,
                    },
                });
            }
        }
    }
    if found.is_empty() {
        return Err(Problem::CnameChain);
    }
    Ok(Answer {
        name: presentation(&name),
        secure: reply.metadata.authentic_data,
        outcome: Outcome::Found(found),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::opt::OPT;
    use hickory_proto::rr::rdata::{A, CNAME, MX, TLSA, TXT};

    fn name(text: &str) -> Name {
        query_name(text).unwrap()
    }

    /// A reply to query `id` for `qname` `rtype`, with `answers`.
    fn reply(
        id: u16,
        qname: &str,
        rtype: RecordType,
        code: ResponseCode,
        ad: bool,
        answers: Vec<Record>,
    ) -> Message {
        let mut message = Message::new(id, MessageType::Response, OpCode::Query);
        message.metadata.response_code = code;
        message.metadata.authentic_data = ad;
        message.metadata.recursion_desired = true;
        message.metadata.recursion_available = true;
        message.add_query(Query::query(name(qname), rtype));
        message.add_answers(answers);
        message
    }

    fn record(owner: &str, data: RData) -> Record {
        Record::from_rdata(name(owner), 300, data)
    }

    fn bytes(message: &Message) -> Vec<u8> {
        message.to_vec().unwrap()
    }

    fn mx_of(data: &RData) -> Option<(u16, String)> {
        match data {
            RData::MX(mx) => Some((mx.preference, presentation(&mx.exchange))),
            _ => None,
        }
    }

    fn a_of(data: &RData) -> Option<IpAddr> {
        match data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        }
    }

    #[test]
    fn the_query_asks_for_dnssec_with_do_and_ad_and_recursion() {
        let query = query_message(0x1234, &name("Dane.Test"), RecordType::TLSA);
        let decoded = Message::from_vec(&query.to_vec().unwrap()).unwrap();
        assert_eq!(decoded.metadata.id, 0x1234);
        assert_eq!(decoded.metadata.message_type, MessageType::Query);
        assert!(decoded.metadata.recursion_desired);
        assert!(decoded.metadata.authentic_data);
        let edns = decoded.edns.as_ref().unwrap();
        assert!(edns.flags().dnssec_ok);
        assert_eq!(edns.max_payload(), EDNS_PAYLOAD);
        assert_eq!(decoded.queries.len(), 1);
        assert_eq!(decoded.queries[0].query_type(), RecordType::TLSA);
        assert_eq!(decoded.queries[0].query_class(), DNSClass::IN);
        assert_eq!(presentation(decoded.queries[0].name()), "dane.test");
    }

    #[test]
    fn names_are_checked_and_shown_in_lower_case_without_the_dot() {
        assert_eq!(presentation(&name("MX1.Dane.Test.")), "mx1.dane.test");
        assert_eq!(presentation(&Name::root()), "");
        for bad in ["", ".", "bad..name", "ünïcode.test", &"a".repeat(64)] {
            assert!(
                matches!(query_name(bad), Err(Error::InvalidName { .. })),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_secure_mx_answer_is_found_and_secure() {
        let answers = vec![
            record("dane.test", RData::MX(MX::new(10, name("MX1.dane.test")))),
            record("dane.test", RData::MX(MX::new(20, name("mx2.dane.test")))),
        ];
        let message = reply(
            7,
            "dane.test",
            RecordType::MX,
            ResponseCode::NoError,
            true,
            answers,
        );
        let checked = interpret(7, &name("DANE.test"), RecordType::MX, &bytes(&message)).unwrap();
        let answer = answer(&name("dane.test"), RecordType::MX, &checked, mx_of).unwrap();
        assert_eq!(answer.name, "dane.test");
        assert!(answer.secure);
        assert_eq!(
            answer.outcome,
            Outcome::Found(vec![
                (10, "mx1.dane.test".into()),
                (20, "mx2.dane.test".into())
            ])
        );
    }

    #[test]
    fn a_cname_chain_is_followed_to_the_final_name() {
        let answers = vec![
            record("alias.test", RData::CNAME(CNAME(name("middle.test")))),
            record("middle.test", RData::CNAME(CNAME(name("host.test")))),
            record("host.test", RData::A(A::new(192, 0, 2, 1))),
        ];
        let message = reply(
            1,
            "alias.test",
            RecordType::A,
            ResponseCode::NoError,
            false,
            answers,
        );
        let answer = answer(&name("alias.test"), RecordType::A, &message, a_of).unwrap();
        assert_eq!(answer.name, "host.test");
        assert!(!answer.secure);
        assert_eq!(answer.found(), Some(&vec!["192.0.2.1".parse().unwrap()]));
    }

    #[test]
    fn a_cname_to_nothing_is_nodata_or_nxdomain_at_the_target() {
        for (code, outcome) in [
            (ResponseCode::NoError, Outcome::NoData),
            (ResponseCode::NXDomain, Outcome::NxDomain),
        ] {
            let answers = vec![record("alias.test", RData::CNAME(CNAME(name("gone.test"))))];
            let message = reply(1, "alias.test", RecordType::A, code, true, answers);
            let answer = answer(&name("alias.test"), RecordType::A, &message, a_of).unwrap();
            assert_eq!(answer.name, "gone.test");
            assert!(answer.secure);
            assert_eq!(answer.outcome, outcome);
        }
    }

    #[test]
    fn a_looping_or_endless_cname_chain_is_an_error() {
        let looping = vec![
            record("a.test", RData::CNAME(CNAME(name("b.test")))),
            record("b.test", RData::CNAME(CNAME(name("a.test")))),
        ];
        let endless: Vec<Record> = (0..=MAX_CNAME_CHAIN)
            .map(|n| {
                let target = name(&format!("n{}.test", n + 1));
                record(&format!("n{n}.test"), RData::CNAME(CNAME(target)))
            })
            .collect();
        for (start, answers) in [("a.test", looping), ("n0.test", endless)] {
            let message = reply(
                1,
                start,
                RecordType::A,
                ResponseCode::NoError,
                true,
                answers,
            );
            assert_eq!(
                answer(&name(start), RecordType::A, &message, a_of),
                Err(Problem::CnameChain)
            );
        }
    }

    #[test]
    fn denials_keep_their_secure_flag() {
        for (code, ad, outcome) in [
            (ResponseCode::NXDomain, true, Outcome::NxDomain),
            (ResponseCode::NXDomain, false, Outcome::NxDomain),
            (ResponseCode::NoError, true, Outcome::NoData),
            (ResponseCode::NoError, false, Outcome::NoData),
        ] {
            let message = reply(3, "x.dane.test", RecordType::TLSA, code, ad, vec![]);
            let checked =
                interpret(3, &name("x.dane.test"), RecordType::TLSA, &bytes(&message)).unwrap();
            let answer = answer(&name("x.dane.test"), RecordType::TLSA, &checked, |_| {
                Some(())
            })
            .unwrap();
            assert_eq!(answer.found(), None);
            assert_eq!((answer.secure, answer.outcome), (ad, outcome));
        }
    }

    #[test]
    fn records_of_other_types_or_owners_are_not_answers() {
        let answers = vec![
            record("other.test", RData::A(A::new(192, 0, 2, 9))),
            record(
                "host.test",
                RData::TXT(TXT::new(vec!["not an address".into()])),
            ),
        ];
        let message = reply(
            1,
            "host.test",
            RecordType::A,
            ResponseCode::NoError,
            true,
            answers,
        );
        let answer = answer(&name("host.test"), RecordType::A, &message, a_of).unwrap();
        assert_eq!(answer.outcome, Outcome::NoData);
    }

    #[test]
    fn servfail_carries_the_extended_dns_error() {
        let mut message = reply(
            5,
            "bogus.test",
            RecordType::MX,
            ResponseCode::ServFail,
            false,
            vec![],
        );
        let mut ede = 6u16.to_be_bytes().to_vec();
        ede.extend_from_slice(b"validation failure");
        let mut edns = Edns::new();
        *edns.options_mut() = OPT::new(vec![(
            EdnsCode::from(EDE_OPTION),
            EdnsOption::Unknown(EDE_OPTION, ede),
        )]);
        message.set_edns(edns);
        assert_eq!(
            interpret(5, &name("bogus.test"), RecordType::MX, &bytes(&message)),
            Err(Problem::ServFail(Some(
                "DNSSEC Bogus (6): validation failure".into()
            )))
        );
        // Without one, still SERVFAIL.
        message.edns = None;
        assert_eq!(
            interpret(5, &name("bogus.test"), RecordType::MX, &bytes(&message)),
            Err(Problem::ServFail(None))
        );
    }

    #[test]
    fn other_error_codes_are_errors() {
        let message = reply(
            5,
            "x.test",
            RecordType::MX,
            ResponseCode::Refused,
            false,
            vec![],
        );
        assert_eq!(
            interpret(5, &name("x.test"), RecordType::MX, &bytes(&message)),
            Err(Problem::Rcode("Refused (5)".into()))
        );
    }

    #[test]
    fn replies_to_other_queries_are_strays() {
        let good = reply(
            9,
            "x.test",
            RecordType::MX,
            ResponseCode::NoError,
            true,
            vec![],
        );
        let check =
            |message: &Message| interpret(9, &name("x.test"), RecordType::MX, &bytes(message));
        assert!(check(&good).is_ok());
        let mut other_id = good.clone();
        other_id.metadata.id = 10;
        let mut not_a_response = good.clone();
        not_a_response.metadata.message_type = MessageType::Query;
        let other_name = reply(
            9,
            "y.test",
            RecordType::MX,
            ResponseCode::NoError,
            true,
            vec![],
        );
        let other_type = reply(
            9,
            "x.test",
            RecordType::A,
            ResponseCode::NoError,
            true,
            vec![],
        );
        let mut no_question = good.clone();
        no_question.queries.clear();
        for stray in [
            other_id,
            not_a_response,
            other_name,
            other_type,
            no_question,
        ] {
            assert_eq!(check(&stray), Err(Problem::Stray));
        }
        let mut truncated = good;
        truncated.metadata.truncation = true;
        assert_eq!(check(&truncated), Err(Problem::Truncated));
    }

    #[test]
    fn garbage_is_malformed_never_a_panic() {
        let good = bytes(&reply(
            9,
            "x.test",
            RecordType::TLSA,
            ResponseCode::NoError,
            true,
            vec![record(
                "x.test",
                RData::TLSA(TLSA::new(3.into(), 1.into(), 1.into(), vec![0xab; 32])),
            )],
        ));
        let check = |bytes: &[u8]| interpret(9, &name("x.test"), RecordType::TLSA, bytes);
        assert!(check(&good).is_ok());
        // Every prefix of a real reply, and noise.
        for cut in 0..good.len() {
            assert!(
                matches!(check(&good[..cut]), Err(Problem::Malformed(_))),
                "{cut}"
            );
        }
        assert!(check(&[0xff; 700]).is_err());
    }

    #[test]
    fn the_null_mx_is_the_root() {
        let null = Mx {
            preference: 0,
            exchange: presentation(&Name::root()),
        };
        assert!(null.is_null());
    }

    /// I/O: a resolver on loopback that the test scripts.
    mod exchange {
        use super::*;
        use tokio::net::TcpListener;

        /// A UDP socket on loopback, and the resolver that asks it.
        async fn fake(timeout: Duration) -> (UdpSocket, Resolver) {
            let socket = UdpSocket::bind("127.0.0.1:0").await.unwrap();
            let resolver = Resolver::new(socket.local_addr().unwrap()).with_timeout(timeout);
            (socket, resolver)
        }

        /// Reads one query; returns it and who sent it.
        async fn query(socket: &UdpSocket) -> (Message, SocketAddr) {
            let mut buffer = vec![0u8; 1500];
            let (length, from) = socket.recv_from(&mut buffer).await.unwrap();
            (Message::from_vec(&buffer[..length]).unwrap(), from)
        }

        /// The reply to `query` with `answers`, AD set.
        fn answering(query: &Message, answers: Vec<Record>) -> Message {
            let mut message = Message::new(query.metadata.id, MessageType::Response, OpCode::Query);
            message.metadata.authentic_data = true;
            message.add_query(query.queries[0].clone());
            message.add_answers(answers);
            message
        }

        #[tokio::test(start_paused = true)]
        async fn a_silent_resolver_times_out_at_the_deadline_after_retransmitting() {
            let limit = Duration::from_secs(3);
            let (silent, resolver) = fake(limit).await;
            let start = Instant::now();
            let error = resolver.lookup_mx("dane.test").await.unwrap_err();
            assert!(matches!(error, Error::Timeout { .. }), "{error}");
            assert_eq!(start.elapsed(), limit);
            // Every send reached it: the first and the retransmissions.
            let mut buffer = [0u8; 1500];
            let mut sent = 0;
            while silent.try_recv(&mut buffer).is_ok() {
                sent += 1;
            }
            assert_eq!(sent, UDP_SENDS);
        }

        #[tokio::test]
        async fn a_closed_port_is_an_io_error() {
            let (closed, resolver) = fake(DEFAULT_TIMEOUT).await;
            drop(closed);
            let error = resolver.lookup_txt("x.test").await.unwrap_err();
            assert!(matches!(error, Error::Io { .. }), "{error}");
        }

        #[tokio::test]
        async fn a_resolver_answering_garbage_is_malformed() {
            let (socket, resolver) = fake(DEFAULT_TIMEOUT).await;
            let server = tokio::spawn(async move {
                let (_, from) = query(&socket).await;
                socket.send_to(b"\x00\x01garbage", from).await.unwrap();
            });
            let error = resolver.lookup_mx("dane.test").await.unwrap_err();
            assert!(matches!(error, Error::Malformed { .. }), "{error}");
            server.await.unwrap();
        }

        #[tokio::test]
        async fn strays_are_skipped_and_the_reply_to_the_query_is_taken() {
            let (socket, resolver) = fake(DEFAULT_TIMEOUT).await;
            let server = tokio::spawn(async move {
                let (query, from) = query(&socket).await;
                let mut stray = answering(&query, vec![]);
                stray.metadata.id = query.metadata.id.wrapping_add(1);
                socket.send_to(&bytes(&stray), from).await.unwrap();
                let exchange = name("mx1.dane.test");
                let answers = vec![record("dane.test", RData::MX(MX::new(10, exchange)))];
                let reply = answering(&query, answers);
                socket.send_to(&bytes(&reply), from).await.unwrap();
            });
            let answer = resolver.lookup_mx("dane.test").await.unwrap();
            assert!(answer.secure);
            let mx = Mx {
                preference: 10,
                exchange: "mx1.dane.test".into(),
            };
            assert_eq!(answer.outcome, Outcome::Found(vec![mx]));
            server.await.unwrap();
        }

        #[tokio::test]
        async fn a_truncated_reply_is_asked_again_over_tcp() {
            // UDP and TCP on one port, as a resolver has them.
            let (udp, tcp) = loop {
                let tcp = TcpListener::bind("127.0.0.1:0").await.unwrap();
                if let Ok(udp) = UdpSocket::bind(tcp.local_addr().unwrap()).await {
                    break (udp, tcp);
                }
            };
            let resolver = Resolver::new(udp.local_addr().unwrap());
            let server = tokio::spawn(async move {
                let (query, from) = query(&udp).await;
                let mut truncated = answering(&query, vec![]);
                truncated.metadata.truncation = true;
                udp.send_to(&bytes(&truncated), from).await.unwrap();

                let (mut stream, _) = tcp.accept().await.unwrap();
                let mut length = [0u8; 2];
                stream.read_exact(&mut length).await.unwrap();
                let mut asked = vec![0u8; usize::from(u16::from_be_bytes(length))];
                stream.read_exact(&mut asked).await.unwrap();
                let asked = Message::from_vec(&asked).unwrap();
                let long = vec![b'x'; 255];
                let txt = TXT::from_bytes(vec![&long[..], &long[..], b"end"]);
                let reply = bytes(&answering(&asked, vec![record("x.test", RData::TXT(txt))]));
                let mut framed = u16::try_from(reply.len()).unwrap().to_be_bytes().to_vec();
                framed.extend_from_slice(&reply);
                stream.write_all(&framed).await.unwrap();
            });
            let answer = resolver.lookup_txt("x.test").await.unwrap();
            let mut joined = vec![b'x'; 510];
            joined.extend_from_slice(b"end");
            assert_eq!(answer.found(), Some(&vec![joined]));
            server.await.unwrap();
        }
    }
}
