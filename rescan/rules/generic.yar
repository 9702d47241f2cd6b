/*
  Bundled default rules of rescan: generic indicators for attachments that are rarely
  legitimate in mail. Each is documented in the README ("Bundled rules").
*/
rule Attachment_Windows_Executable
{
    meta:
        author = "rescan"
        description = "A Windows PE executable travelling as a mail attachment or archive member"
    condition:
        uint16(0) == 0x5A4D and uint32(0x3C) < filesize and uint32(uint32(0x3C)) == 0x00004550
}

rule Attachment_Double_Extension
{
    meta:
        author = "rescan"
        description = "A file name hiding an executable extension behind a document one (invoice.pdf.exe)"
    condition:
        filename matches /\.(pdf|docx?|xlsx?|jpe?g|png|txt|zip)\.(exe|scr|com|pif|bat|cmd|js|jse|vbs|vbe|wsf|hta|lnk)$/i
}

rule Office_Document_With_VBA_Macros
{
    meta:
        author = "rescan"
        description = "An Office document carrying a VBA project (macros)"
    strings:
        $ooxml = "vbaProject.bin" ascii
        $ole = "_VBA_PROJECT" wide ascii
    condition:
        (uint32(0) == 0x04034B50 and $ooxml) or (uint32(0) == 0xE011CFD0 and $ole)
}
