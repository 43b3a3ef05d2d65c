# make test-container's stand-in for nginx's official image, which no registry here can give:
# Debian's nginx package, set up as that image is (user nginx, uid 101; the logs on stdout and
# stderr; `nginx -g 'daemon off;'`) and tagged attention-test/nginx-debian, so that it cannot
# pass for nginx's own. Built FROM the test's debian:bookworm-slim, made with debuerreotype.
FROM debian:bookworm-slim

# hadolint ignore=DL3008
RUN --mount=type=secret,id=apt-sources,target=/etc/apt/sources.list.d/debian.sources \
    apt-get update \
    && apt-get install --yes --no-install-recommends nginx wget \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 101 nginx \
    && useradd --system --uid 101 --gid nginx --no-create-home --home-dir /nonexistent \
        --shell /usr/sbin/nologin --no-log-init nginx \
    && ln -sf /dev/stdout /var/log/nginx/access.log \
    && ln -sf /dev/stderr /var/log/nginx/error.log

EXPOSE 8080
STOPSIGNAL SIGQUIT
CMD ["nginx", "-g", "daemon off;"]
