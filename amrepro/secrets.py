"""Credentials out of everything amrepro prints or stores: a tracking URI such as postgresql://user:PASS@host/db
or http://user:PASS@host, a git remote such as https://user:TOKEN@host/repo or https://TOKEN@host/repo. URIs are
found anywhere in a text (an error sentence holds one among words), so one function serves the messages, the
outcome file and the pip freeze. Only the userinfo goes: a redacted URI still says which store or repository it was.
"""

from __future__ import annotations

import re

# scheme://userinfo@ : a user (no '/', '@', ':' or space), then optionally :password up to the last '@' before
# the host (an unescaped '@' in a password is still hidden whole)
_USERINFO = re.compile(r"(?P<scheme>\b[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@\s:]*)(?P<password>:[^/\s]*)?@")


def redact(text: str, mask: str = "***") -> str:
    """text with the password of every URI's userinfo replaced by mask; on http(s) (git+https too) a userinfo
    without a password is a token (https://TOKEN@github.com/...) and is masked whole. A plain user name
    (ssh://git@host, postgresql://user@host) stays. mask="" drops what it would mask, so that the URI still
    works with credentials from elsewhere (PGPASSWORD, ~/.pgpass, MLFLOW_TRACKING_PASSWORD, a git helper)."""

    def clean(match: re.Match) -> str:
        scheme, user, password = match["scheme"], match["user"], match["password"]
        if password is not None:
            return f"{scheme}{user}:{mask}@" if mask else f"{scheme}{user}@"
        if user and re.search(r"https?://$", scheme, re.IGNORECASE):
            return f"{scheme}{mask}@" if mask else scheme
        return match.group(0)

    return _USERINFO.sub(clean, text)


def has_credentials(text: str) -> bool:
    return redact(text) != text
