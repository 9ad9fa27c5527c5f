#!/bin/sh
# with-ca COMMAND...: run COMMAND trusting the CA bundle of the build secret `ca_bundle`, if one
# was given (docker build --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt).
# The secret is mounted only for the RUN step that uses it, so it never lands in a layer.
# Without one, uv and pip keep their own bundled roots.
set -eu
bundle=/run/secrets/ca_bundle
if [ -s "$bundle" ]; then
    SSL_CERT_FILE=$bundle PIP_CERT=$bundle REQUESTS_CA_BUNDLE=$bundle
    export SSL_CERT_FILE PIP_CERT REQUESTS_CA_BUNDLE
fi
exec "$@"
